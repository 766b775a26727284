"""Cache eviction policies over (entry, K) items. Pure: no I/O, time passed in.

Every policy is a sort key: items with the lowest key are evicted first. ``select_victims``
walks that order until the budget is met, optionally sparing the last item of a recently
used prompt (so prompts whose items all score low are not starved).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ItemStats:
    entry: str | int   # a cached generation's id (the simulator's are request rows)
    k: int
    size: int
    created_at: float
    hits: int
    last_used_at: float   # last hit, or creation when never hit

    @property
    def member(self) -> str:
        return f"{self.entry}:{self.k}"


class Policy(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def admits(self) -> bool:  # False: the policy caches nothing (the no-cache baseline)
        ...

    def key(self, item: ItemStats, now: float) -> tuple[float, ...]: ...


@dataclass(frozen=True)
class LCBFU:
    """Least Computationally Beneficial and Frequently Used: score K x hits (the steps the
    item has saved); ties: older first, then smaller K.

    With ``half_life_s`` the score also decays with time since last use:
    K x (hits + 1) x 2^(-idle / half_life), so a never-hit item ranks by K and recency
    instead of all scoring 0, and an item hot long ago cools down.
    """

    half_life_s: float | None = None
    admits: bool = True

    @property
    def name(self) -> str:
        return "lcbfu" if self.half_life_s is None else f"lcbfu-decay{self.half_life_s:g}s"

    def key(self, item: ItemStats, now: float) -> tuple[float, ...]:
        if self.half_life_s is None:
            score = float(item.k * item.hits)
        else:
            idle = max(0.0, now - item.last_used_at)
            score = item.k * (item.hits + 1) * math.pow(2.0, -idle / self.half_life_s)
        return (score, item.created_at, item.k)


@dataclass(frozen=True)
class LRU:
    name: str = "lru"
    admits: bool = True

    def key(self, item: ItemStats, now: float) -> tuple[float, ...]:
        return (item.last_used_at, item.created_at, item.k)


@dataclass(frozen=True)
class LFU:
    name: str = "lfu"
    admits: bool = True

    def key(self, item: ItemStats, now: float) -> tuple[float, ...]:
        return (item.hits, item.created_at, item.k)


@dataclass(frozen=True)
class FIFO:
    name: str = "fifo"
    admits: bool = True

    def key(self, item: ItemStats, now: float) -> tuple[float, ...]:
        return (item.created_at, item.k)


@dataclass(frozen=True)
class NoCache:
    """The baseline: nothing is kept (every item is a victim)."""

    name: str = "none"
    admits: bool = False

    def key(self, item: ItemStats, now: float) -> tuple[float, ...]:
        return (item.created_at, item.k)


POLICIES: dict[str, Policy] = {p.name: p for p in (LCBFU(), LRU(), LFU(), FIFO(), NoCache())}


def policy_by_name(name: str, half_life_s: float = 0.0) -> Policy:
    """'lcbfu', 'lru', 'lfu', 'fifo' or 'none'; a half-life turns on LCBFU's decay, as does
    the name 'lcbfu-decay<seconds>s' (LCBFU's own name for that variant)."""
    if name.startswith("lcbfu-decay") and name.endswith("s"):
        try:
            half_life_s = float(name[len("lcbfu-decay"):-1])
        except ValueError:
            raise ValueError(f"cache policy {name!r}: bad half-life") from None
        name = "lcbfu"
    if name == "lcbfu" and half_life_s > 0:
        return LCBFU(half_life_s=half_life_s)
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"cache policy {name!r} unknown (choose from {sorted(POLICIES)})") from None


@dataclass(frozen=True)
class Budget:
    """Evict when over ``max_bytes`` or ``max_items`` (0 = no limit), down to ``low_water``
    of each, so the evictor does not run again at the very next insert."""

    max_bytes: int = 0
    max_items: int = 0
    low_water: float = 0.9

    def __post_init__(self) -> None:
        if self.max_bytes < 0 or self.max_items < 0 or not 0.0 < self.low_water <= 1.0:
            raise ValueError(f"bad cache budget {self}")

    def over(self, total_bytes: int, total_items: int) -> bool:
        return ((self.max_bytes > 0 and total_bytes > self.max_bytes)
                or (self.max_items > 0 and total_items > self.max_items))

    def excess(self, total_bytes: int, total_items: int) -> tuple[int, int]:
        """(bytes, items) to free to reach the low-water mark; (0, 0) when within budget."""
        if not self.over(total_bytes, total_items):
            return 0, 0
        free_bytes = (max(0, total_bytes - math.floor(self.max_bytes * self.low_water))
                      if self.max_bytes else 0)
        free_items = (max(0, total_items - math.floor(self.max_items * self.low_water))
                      if self.max_items else 0)
        return free_bytes, free_items


def select_victims(policy: Policy, items: Sequence[ItemStats], free_bytes: int,
                   free_items: int, now: float, keep_recent_s: float = 0.0) -> list[ItemStats]:
    """Items to evict, in order, to free at least ``free_bytes`` and ``free_items``.

    With ``keep_recent_s`` > 0, the last remaining item of a prompt used within that many
    seconds goes only after every other candidate: spared while the budget allows, never at
    the budget's expense. A no-cache policy evicts everything.
    """
    def order(candidate: ItemStats) -> tuple:
        return (*policy.key(candidate, now), candidate.entry)  # entry: a total, stable order

    ranked = sorted(items, key=order)
    if not policy.admits:
        return ranked
    remaining = Counter(item.entry for item in items)
    last_use: dict[str | int, float] = {}
    for item in items:
        last_use[item.entry] = max(last_use.get(item.entry, 0.0), item.last_used_at)
    victims: list[ItemStats] = []
    spared: list[ItemStats] = []
    freed_bytes = freed_items = 0
    for item in ranked:
        if freed_bytes >= free_bytes and freed_items >= free_items:
            return victims
        recent = keep_recent_s > 0 and now - last_use[item.entry] <= keep_recent_s
        if recent and remaining[item.entry] == 1:
            spared.append(item)
            continue
        victims.append(item)
        remaining[item.entry] -= 1
        freed_bytes += item.size
        freed_items += 1
    for item in spared:  # the budget still is not met: the spared go too, in policy order
        if freed_bytes >= free_bytes and freed_items >= free_items:
            break
        victims.append(item)
        freed_bytes += item.size
        freed_items += 1
    return victims

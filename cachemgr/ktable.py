"""Similarity -> K: how many denoising steps a cached latent may replace. Pure.

A table maps a top-1 cosine similarity to K out of ``reference_steps`` (50 in the reference
work). A job of N steps scales each K to round(K * N / reference_steps), so the K set of a
10-step job is {1, 2, 3, 4, 5}. Tables are data: ``KTable.from_json`` reads one from a file.
A table also names the step cache (core.stepcache) its profile chose for the model, what
T2I_STEP_CACHE=auto serves with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.stepcache import OFF, StepCache


@dataclass(frozen=True)
class KTable:
    name: str
    thresholds: tuple[tuple[float, int], ...]   # (min similarity, K), highest similarity first
    reference_steps: int = 50
    step_cache: str = OFF

    def __post_init__(self) -> None:
        StepCache.parse(self.step_cache)
        sims = [sim for sim, _ in self.thresholds]
        if sims != sorted(sims, reverse=True) or len(set(sims)) != len(sims):
            raise ValueError(f"k table {self.name!r}: thresholds must strictly decrease, got {sims}")
        for sim, k in self.thresholds:
            if not -1.0 <= sim <= 1.0 or not 0 < k < self.reference_steps:
                raise ValueError(f"k table {self.name!r}: bad row (similarity {sim}, K {k})")

    def scale(self, k: int, steps: int) -> int:
        return round(k * steps / self.reference_steps)

    def k_for(self, similarity: float, steps: int) -> int | None:
        """K (out of ``steps``) for this similarity, or None for a miss."""
        for threshold, k in self.thresholds:
            if similarity >= threshold:
                scaled = self.scale(k, steps)
                return scaled if 0 < scaled < steps else None
        return None

    def k_set(self, steps: int) -> frozenset[int]:
        """The steps after which a full generation of ``steps`` steps keeps its latent."""
        return frozenset(s for _, k in self.thresholds if 0 < (s := self.scale(k, steps)) < steps)

    def resumed_capture(self, steps: int, resumed_from: int) -> frozenset[int]:
        """What a job resumed from step ``resumed_from`` keeps: its latents at the K set
        above that step (below it, it ran none of its own)."""
        return frozenset(k for k in self.k_set(steps) if k > resumed_from)

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "reference_steps": self.reference_steps,
                           "thresholds": [[sim, k] for sim, k in self.thresholds],
                           "step_cache": self.step_cache}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> KTable:
        data = json.loads(text)
        return cls(name=data["name"], reference_steps=data.get("reference_steps", 50),
                   thresholds=tuple((float(sim), int(k)) for sim, k in data["thresholds"]),
                   step_cache=data.get("step_cache", OFF))

    @classmethod
    def load(cls, spec: str) -> KTable:
        """'reference' or a path to a JSON table."""
        if spec == REFERENCE_TABLE.name:
            return REFERENCE_TABLE
        return cls.from_json(Path(spec).expanduser().read_text())


def derive_table(name: str, steps: int, ratios: dict[float, dict[int, float]],
                 tolerance: float) -> KTable:
    """A table from a quality profile: ``ratios[lower similarity edge][K]`` is the score of
    images resumed at K (out of ``steps``) over the score from scratch, for prompt pairs
    whose similarity falls in that bin. Each bin gets the largest K such that it and every
    smaller profiled K keep ``tolerance`` of the from-scratch score; a less similar bin never
    gets a larger K than a more similar one. Bins that keep no K end the table (a miss)."""
    rows: list[tuple[float, int]] = []
    cap = steps - 1
    for edge in sorted(ratios, reverse=True):
        safe = 0
        for k in sorted(ratios[edge]):
            if ratios[edge][k] < tolerance:
                break
            safe = k
        cap = min(cap, safe)
        if cap == 0:
            break
        if rows and rows[-1][1] == cap:
            rows[-1] = (edge, cap)  # the same K reaches down to this bin's edge
        else:
            rows.append((edge, cap))
    if not rows:
        raise ValueError(f"no similarity bin keeps {tolerance:.0%} of the from-scratch score "
                         "at any profiled K: no table to derive")
    return KTable(name=name, thresholds=tuple(rows), reference_steps=steps)


# NIRVANA's table, profiled for CLIP text embeddings (another embedder needs its own profile).
REFERENCE_TABLE = KTable(name="reference", thresholds=(
    (0.95, 25), (0.90, 20), (0.85, 15), (0.75, 10), (0.65, 5)))


def largest_stored_at_most(k: int, stored: frozenset[int] | set[int]) -> int | None:
    """Hole handling: the largest stored K not above ``k`` (an evicted item leaves a hole)."""
    usable = [s for s in stored if s <= k]
    return max(usable) if usable else None

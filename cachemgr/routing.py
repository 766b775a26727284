"""Triage's cache decision: resume from (entry, K) or generate in full, and why. Pure.

Three rules bound K, in this order: the table (the similarity to the entry's prompt earns
a K), the seed (a hit from another seed's latent may be capped, by the seed policy; a LoRA
job's hit on a base-model latent is capped at the step its LoRA starts acting), and the
lineage (a latent that was itself resumed carries steps of earlier prompts: no prompt
may supply more steps than the table grants for its own similarity to the new prompt).
The hole rule then takes the largest stored K within all three.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cachemgr.ktable import KTable
from core.plan import Lineage, Reason, Segment


@dataclass(frozen=True)
class CachedEntry:
    """What triage needs to know of a cached generation besides its similarity."""

    stored: frozenset[int]          # the K values still stored
    lineage: Lineage


EntryInfo = Callable[[str], CachedEntry | None]
"""entry -> its stored Ks and lineage (None: gone, or cached before lineage was kept)."""

AncestorSimilarity = Callable[[Segment], float]
"""The new prompt's similarity to an earlier prompt of a lineage."""


@dataclass(frozen=True)
class CacheDecision:
    reason: Reason
    similarity: float | None = None
    entry: str | None = None
    wanted_k: int | None = None     # K earned by the similarity
    k: int | None = None            # K actually used (after seed cap, lineage and holes)
    lineage: Lineage | None = None  # the entry's, when it resumes

    @property
    def resume(self) -> bool:
        return self.k is not None


# How many nearest cached entries triage weighs. The nearest may be an entry kept by a
# resumed job, which has latents only above the K it resumed from; a slightly farther
# entry may still have the K the similarity earns. On the first 100k requests of the
# trace (simulated, admission of resumed latents on) 1 candidate saved 19.7% of steps,
# 2 saved 20.6%, 4 saved 20.9% and 8 saved 21.0%.
LOOKUP_CANDIDATES = 4


@dataclass(frozen=True)
class Bounds:
    """What bounds K for one request besides its similarity to an entry."""

    table: KTable
    steps: int
    seed: int
    seed_cap: int | None            # K cap (of the request's steps) for another seed's latent
    lineage: bool                   # apply the lineage rule (off only to measure the old rule)
    ancestor_similarity: AncestorSimilarity
    k_cap: int | None = None        # K cap for every entry (a LoRA job's base-model hits)


def decide(matches: Sequence[tuple[str, float]], entries: EntryInfo,
           bounds: Bounds) -> CacheDecision:
    """``matches`` are the nearest cached entries with their cosine similarities, nearest
    first (empty: nothing cached). The match that can resume from the largest K wins (the
    nearer on a tie); when none can, the reason is the nearest's."""
    if not matches:
        return CacheDecision(Reason.MISS)
    best = _decide_one(*matches[0], entries, bounds)
    for entry, similarity in matches[1:]:
        decision = _decide_one(entry, similarity, entries, bounds)
        if (decision.k or 0) > (best.k or 0):
            best = decision
    return best


def lineage_allows(segments: Sequence[Segment], grant: Callable[[Segment], int]) -> bool:
    """A latent made by ``segments`` may be reused only if each prompt that ran some of its
    steps is granted, for its own similarity, a K reaching the end of its steps."""
    return all(grant(segment) >= segment.until for segment in segments)


def _decide_one(entry: str, similarity: float, entries: EntryInfo,
                bounds: Bounds) -> CacheDecision:
    table, steps = bounds.table, bounds.steps
    wanted = table.k_for(similarity, steps)
    if wanted is None:
        return CacheDecision(Reason.BELOW_THRESHOLD, similarity, entry)
    info = entries(entry)
    if info is None:
        return CacheDecision(Reason.NO_STORED_K, similarity, entry, wanted)
    lineage = info.lineage
    limit, limit_reason = wanted, Reason.HOLE
    if bounds.seed_cap is not None and lineage.noise_seed != bounds.seed:
        if bounds.seed_cap < limit:
            limit, limit_reason = bounds.seed_cap, Reason.SEED_CAP
    if bounds.k_cap is not None and bounds.k_cap < limit:
        limit, limit_reason = bounds.k_cap, Reason.ADAPTER_CAP
    grants: dict[str, int] = {}

    def grant(segment: Segment) -> int:
        if segment.source not in grants:
            own = segment.source == lineage.segments[-1].source
            grants[segment.source] = wanted if own else (
                table.k_for(bounds.ancestor_similarity(segment), steps) or 0)
        return grants[segment.source]

    capped_by_lineage = False
    for k in sorted((k for k in info.stored if k <= limit), reverse=True):
        if not bounds.lineage or lineage_allows(lineage.through(k), grant):
            reason = (Reason.HIT if k == wanted else
                      Reason.LINEAGE_CAP if capped_by_lineage else limit_reason)
            return CacheDecision(reason, similarity, entry, wanted, k, lineage)
        capped_by_lineage = True
    reason = (Reason.LINEAGE_CAP if capped_by_lineage else limit_reason
              if limit_reason in (Reason.SEED_CAP, Reason.ADAPTER_CAP) else Reason.NO_STORED_K)
    return CacheDecision(reason, similarity, entry, wanted)

"""Triage's cache decision: resume from (entry, K) or generate in full, and why. Pure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from cachemgr.ktable import KTable, largest_stored_at_most


class Reason(StrEnum):
    HIT = "hit"                          # resume from the K the similarity earned
    HOLE = "hole fallback"               # that K was evicted: resume from a smaller stored K
    BELOW_THRESHOLD = "below threshold"  # nearest cached prompt too far
    MISS = "miss"                        # nothing cached in this partition
    NO_STORED_K = "hole: no stored K"    # the match has no item at or below the K earned
    PREDICTED_MISS = "predicted miss"    # the match predictor skipped the lookup
    CACHE_OFF = "cache off"
    INDEX_UNAVAILABLE = "index unavailable"


@dataclass(frozen=True)
class CacheDecision:
    reason: Reason
    similarity: float | None = None
    entry: str | None = None
    wanted_k: int | None = None     # K earned by the similarity
    k: int | None = None            # K actually used (after hole fallback)

    @property
    def resume(self) -> bool:
        return self.k is not None

    def details(self) -> dict[str, object]:
        """Fields shown on the job record."""
        return {"similarity": self.similarity, "matched_entry": self.entry,
                "wanted_k": self.wanted_k, "k": self.k}


def decide(match: tuple[str, float] | None, stored_ks: Callable[[str], frozenset[int]],
           table: KTable, steps: int) -> CacheDecision:
    """``match`` is the nearest cached entry and its cosine similarity (None: nothing cached);
    ``stored_ks(entry)`` gives the K values still stored for an entry."""
    if match is None:
        return CacheDecision(Reason.MISS)
    entry, similarity = match
    wanted = table.k_for(similarity, steps)
    if wanted is None:
        return CacheDecision(Reason.BELOW_THRESHOLD, similarity, entry)
    k = largest_stored_at_most(wanted, stored_ks(entry))
    if k is None:
        return CacheDecision(Reason.NO_STORED_K, similarity, entry, wanted)
    return CacheDecision(Reason.HIT if k == wanted else Reason.HOLE, similarity, entry, wanted, k)

"""The cache plan on a job record: triage's decision, typed, as the GPU worker reads it and
(in part) as a poller sees it. The decision itself is made in cachemgr.plan. Pure."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any


class Route(StrEnum):
    FULL = "full"        # from noise, all steps
    RESUME = "resume"    # from a cached latent at step K


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
class CachePlan:
    """Triage's decision for one job, handed to the GPU worker on the job record."""

    route: Route
    reason: Reason
    partition: str = ""
    entry: str | None = None            # the cached generation to resume from
    k: int | None = None                # the step to resume from (after hole fallback)
    wanted_k: int | None = None         # the K the similarity earned
    similarity: float | None = None
    looked_up: bool = False             # the index was asked (not skipped, not down)
    predictor: str = ""                 # version of the match predictor consulted
    predicted_hit: bool | None = None
    audited: bool = False               # a predicted miss looked up anyway, to measure it
    table: str = ""                     # the similarity -> K table's name

    def public(self) -> dict[str, Any]:
        """What a poller sees: no partition hash, no internal entry id."""
        return {"route": str(self.route), "k": self.k, "similarity": self.similarity,
                "reason": str(self.reason)}

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CachePlan:
        data = json.loads(text)
        return cls(**{**data, "route": Route(data["route"]), "reason": Reason(data["reason"])})


FULL_CACHE_OFF = CachePlan(Route.FULL, Reason.CACHE_OFF)

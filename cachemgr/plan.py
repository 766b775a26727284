"""The reuse decision, whole and in one place: what triage plans for a job, what a job
keeps for later jobs, and what the match predictor learns from. Triage, the GPU worker and
the simulator all call these functions, so no copy of a rule can drift. Pure: the vector
index and the stored Ks are ports, implemented by Chroma and Redis live and by in-memory
structures in the simulator and the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from cachemgr.ktable import KTable
from cachemgr.predictor import MatchPredictor, consult
from cachemgr.routing import LOOKUP_CANDIDATES, CacheDecision, decide
from core.errors import VectorIndexUnavailable
from core.plan import CachePlan, Reason, Route


class NearestIndex(Protocol):
    """The nearest cached prompts of a partition (Chroma live, an exact search offline)."""

    def nearest(self, embedding: np.ndarray, partition: str,
                n: int) -> list[tuple[str, float]]: ...


StoredKs = Callable[[str], frozenset[int]]
"""entry -> the K values still stored for it (the catalog live, a dict offline)."""


def plan_reuse(embedding: np.ndarray, partition: str, steps: int, index: NearestIndex,
               stored_ks: StoredKs, table: KTable, predictor: MatchPredictor,
               audit_fraction: float, draw: Callable[[], float]) -> CachePlan:
    """Ask the predictor whether a lookup is worth it; if so, weigh the nearest
    LOOKUP_CANDIDATES cached entries of the partition and take the largest usable K (the
    hole rule: never more than a stored K). An index that is down plans a full
    generation."""
    verdict = consult(predictor, embedding, audit_fraction, draw)
    common: dict[str, Any] = {"partition": partition, "predictor": predictor.version,
                              "predicted_hit": verdict.predicted_hit,
                              "audited": verdict.audited, "table": table.name}
    if not verdict.look_up:
        return CachePlan(Route.FULL, Reason.PREDICTED_MISS, **common)
    try:
        matches = index.nearest(embedding, partition, LOOKUP_CANDIDATES)
    except VectorIndexUnavailable:
        return CachePlan(Route.FULL, Reason.INDEX_UNAVAILABLE, **common)
    return _from_decision(decide(matches, stored_ks, table, steps), common)


def _from_decision(decision: CacheDecision, common: dict[str, Any]) -> CachePlan:
    return CachePlan(Route.RESUME if decision.resume else Route.FULL, decision.reason,
                     entry=decision.entry, k=decision.k, wanted_k=decision.wanted_k,
                     similarity=decision.similarity, looked_up=True, **common)


def teaches_predictor(plan: CachePlan) -> bool:
    """The one rule for training samples: a prompt whose real lookup found a usable match.
    (A lookup the predictor skipped teaches nothing: its outcome is not known live.)"""
    return plan.looked_up and plan.route is Route.RESUME


def kept_ks(plan: CachePlan | None, table: KTable, steps: int,
            admit_resumed: bool) -> frozenset[int]:
    """The steps after which a job keeps its latent for later jobs: a full generation its
    table's K set; a resumed one the K set above its K (below it, it ran none of its own),
    or nothing when resumed jobs are not admitted."""
    if plan is None or plan.route is Route.FULL or plan.k is None:
        return table.k_set(steps)
    return table.resumed_capture(steps, plan.k) if admit_resumed else frozenset()

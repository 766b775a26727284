"""The reuse decision, whole and in one place: what triage plans for a job, what a job
keeps for later jobs (and the lineage it records), and what the match predictor learns
from. Triage, the GPU worker and the simulator all call these functions, so no copy of a
rule can drift. Pure: the vector index, the cached entries and the similarity to earlier
prompts are ports, implemented by Chroma, Redis and the embedder live and by in-memory
structures in the simulator and the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Protocol

import numpy as np

from cachemgr.ktable import KTable
from cachemgr.predictor import MatchPredictor, consult
from cachemgr.routing import (
    LOOKUP_CANDIDATES,
    AncestorSimilarity,
    Bounds,
    CacheDecision,
    EntryInfo,
    decide,
)
from core.errors import VectorIndexUnavailable
from core.plan import CachePlan, Lineage, Reason, Reseed, Route, SeedRule, Segment


class NearestIndex(Protocol):
    """The nearest cached prompts of a partition (Chroma live, an exact search offline)."""

    def nearest(self, embedding: np.ndarray, partition: str,
                n: int) -> list[tuple[str, float]]: ...


@dataclass(frozen=True)
class SeedPolicy:
    """What a hit from another seed's latent does, so a re-roll gets its own picture."""

    rule: SeedRule
    max_fraction: float | None = None   # K at most this fraction of the steps (None: no cap)
    renoise_fraction: float = 0.5       # RENOISE runs from this fraction of K

    def cap(self, steps: int) -> int | None:
        """The cap on K (of ``steps``) for a hit from another seed's latent: rounded down,
        so no job reuses more of its steps than the profile allowed (a fraction of the job's
        steps, not of a table's: tables may be profiled at other step counts)."""
        return None if self.max_fraction is None else int(steps * self.max_fraction + 1e-9)


# The re-roll diversity profile (bench/results/reroll-diversity-scene.json, 64 prompts x 4
# seeds, 25 steps, `python -m quality.reroll -n 64`) picks it: swapping the cached latent's
# noise for the job's keeps 99% [99, 100] (features) and 98% [97, 98] (pixels) of
# from-scratch re-roll diversity at K 1 of 25, 97% [96, 99] and 93% [91, 95] at K 2, 89%
# and 75% at K 5, adherence unchanged. The cap stays at 4% of the steps (2 of 50), inside
# the 8% the profile would allow (its point estimates at K 2 of 25).
DEFAULT_SEED_POLICY = SeedPolicy(SeedRule.NOISE_SWAP, max_fraction=0.04)

# The rule after which a job's latents carry its own seed's noise; after the others they
# carry a mix, which is not any seed's: keep the entry's, so a later hit is reseeded.
_TAKES_JOB_NOISE = frozenset({SeedRule.NOISE_SWAP})


@dataclass(frozen=True)
class ReuseRules:
    """Which of the reuse rules apply. Live, all of them; the replay also runs the old rules
    (seeds ignored, no lineage, no exact path) beside them, to measure what they change."""

    seed: SeedPolicy | None = DEFAULT_SEED_POLICY
    lineage: bool = True
    exact: bool = True


OLD_RULES = ReuseRules(seed=None, lineage=False, exact=False)


@dataclass(frozen=True)
class Query:
    """The request as the reuse decision sees it."""

    embedding: np.ndarray
    partition: str
    steps: int
    seed: int
    # A LoRA job: the base model's partition and the step its LoRA starts acting at. Its
    # steps before that run the base model, so a base-model latent up to there is as good
    # for it as for a job without the LoRA (looked up when its own partition has no hit).
    base: tuple[str, int] | None = None


def plan_exact(source: str | None, steps: int, partition: str) -> CachePlan | None:
    """An identical finished request's image (``source`` is its job id): no step runs."""
    if source is None:
        return None
    return CachePlan(Route.EXACT, Reason.EXACT_REPEAT, partition=partition, entry=source,
                     k=steps, similarity=1.0)


def plan_reuse(query: Query, index: NearestIndex, entries: EntryInfo,
               ancestor_similarity: AncestorSimilarity, table: KTable,
               predictor: MatchPredictor, audit_fraction: float, draw: Callable[[], float],
               rules: ReuseRules = ReuseRules()) -> CachePlan:
    """Ask the predictor whether a lookup is worth it; if so, weigh the nearest
    LOOKUP_CANDIDATES cached entries of the partition and take the largest K the table,
    the seed policy, the lineage and the stored Ks allow (cachemgr.routing). An index that
    is down plans a full generation."""
    verdict = consult(predictor, query.embedding, audit_fraction, draw)
    common: dict[str, Any] = {"partition": query.partition, "predictor": predictor.version,
                              "predicted_hit": verdict.predicted_hit,
                              "audited": verdict.audited, "table": table.name}
    if not verdict.look_up:
        return CachePlan(Route.FULL, Reason.PREDICTED_MISS, **common)
    try:
        matches = index.nearest(query.embedding, query.partition, LOOKUP_CANDIDATES)
    except VectorIndexUnavailable:
        return CachePlan(Route.FULL, Reason.INDEX_UNAVAILABLE, **common)
    policy = rules.seed
    seed_cap = policy.cap(query.steps) if policy is not None else None
    bounds = Bounds(table, query.steps, query.seed, seed_cap, rules.lineage,
                    ancestor_similarity)
    plan = _from_decision(decide(matches, entries, bounds), query.seed, policy, common)
    if plan.route is Route.RESUME or query.base is None or query.base[1] < 1:
        return plan
    base_partition, lora_from = query.base
    try:
        matches = index.nearest(query.embedding, base_partition, LOOKUP_CANDIDATES)
    except VectorIndexUnavailable:
        return plan
    base = _from_decision(decide(matches, entries, replace(bounds, k_cap=lora_from)),
                          query.seed, policy, {**common, "partition": base_partition})
    return base if base.route is Route.RESUME else plan


def _from_decision(decision: CacheDecision, seed: int, policy: SeedPolicy | None,
                   common: dict[str, Any]) -> CachePlan:
    if not decision.resume:
        return CachePlan(Route.FULL, decision.reason, entry=decision.entry,
                         wanted_k=decision.wanted_k, similarity=decision.similarity,
                         looked_up=True, **common)
    k, lineage = int(decision.k or 0), decision.lineage
    reseed = None
    if policy is not None and lineage is not None and lineage.noise_seed != seed:
        run_from = (min(k - 1, max(1, round(k * policy.renoise_fraction)))
                    if policy.rule is SeedRule.RENOISE else k)
        reseed = Reseed(policy.rule, lineage.noise_seed, run_from)
    return CachePlan(Route.RESUME, decision.reason, entry=decision.entry, k=k,
                     wanted_k=decision.wanted_k, similarity=decision.similarity,
                     looked_up=True, source_lineage=lineage, reseed=reseed, **common)


def teaches_predictor(plan: CachePlan) -> bool:
    """The one rule for training samples: a prompt whose real lookup found a usable match.
    (A lookup the predictor skipped teaches nothing: its outcome is not known live.)"""
    return plan.looked_up and plan.route is Route.RESUME


def kept_ks(plan: CachePlan | None, table: KTable, steps: int, admit_resumed: bool,
            rules: ReuseRules = ReuseRules()) -> frozenset[int]:
    """The steps after which a job keeps its latent for later jobs: a full generation its
    table's K set and the seed cap's K (what a hit from another seed may resume from); a
    resumed one the K set above its K (below it, it ran none of its own), or nothing when
    resumed jobs are not admitted; an exact repeat nothing (it ran none)."""
    if plan is None or plan.route is Route.FULL or plan.k is None:
        cap = rules.seed.cap(steps) if rules.seed is not None else None
        return table.k_set(steps) | ({cap} if cap is not None and 0 < cap < steps else set())
    if plan.route is Route.EXACT:
        return frozenset()
    return table.resumed_capture(steps, plan.k) if admit_resumed else frozenset()


def lineage_after(plan: CachePlan | None, source: str, prompt: str, steps: int,
                  seed: int, step_cache: str) -> Lineage:
    """The lineage of the latents a job keeps: its own, after the resumed entry's steps up
    to K; their noise is the job's own seed's unless a resume kept the entry's noise; the
    step cache is the job's (a resume stays in its partition, so the entry's is the same)."""
    if plan is None or plan.route is not Route.RESUME or plan.source_lineage is None \
            or plan.k is None:
        return Lineage.own(source, prompt, steps, seed, step_cache)
    parent = plan.source_lineage
    takes_job_noise = plan.reseed is not None and plan.reseed.rule in _TAKES_JOB_NOISE
    return Lineage(parent.through(plan.k) + (Segment(source, prompt, steps),),
                   seed if takes_job_noise else parent.noise_seed, step_cache)


class HitKind(StrEnum):
    """What a hit reused, for the savings split that says where they come from."""

    EXACT = "exact"          # the same prompt and seed: the picture the user already had
    REROLL = "re-roll"       # the same prompt, another seed
    NEAR = "near edit"       # another prompt's latent, all of whose steps it ran
    CHAINED = "chained"      # a latent whose first steps came from yet another prompt


def hit_kind(plan: CachePlan, prompt: str, seed: int) -> HitKind:
    """The kind of a hit (a plan that routes EXACT or RESUME)."""
    lineage = plan.source_lineage
    if plan.route is Route.EXACT or lineage is None or plan.k is None:
        return HitKind.EXACT if plan.route is Route.EXACT else HitKind.NEAR
    segments = lineage.through(plan.k)
    if len(segments) > 1:
        return HitKind.CHAINED
    if segments[0].prompt == prompt:
        return HitKind.EXACT if lineage.noise_seed == seed else HitKind.REROLL
    return HitKind.NEAR

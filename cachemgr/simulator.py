"""The cache simulator: a trace through the project's own cache logic, generation simulated.

It runs the same pieces triage and the cache manager run (similarity -> K table, hole
handling, eviction policies, the match predictor) over precomputed prompt embeddings; a
full job costs N steps and a resume N - K. The vector search is an exact in-memory cosine
top-1 per partition (the live system asks Chroma; bench/replay checks their agreement).
Pure: numpy and the cache modules only; time is the requests' arrival times.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cachemgr.ktable import KTable
from cachemgr.policies import Budget, ItemStats, Policy, select_victims
from cachemgr.predictor import AlwaysLookUp, MatchPredictor, consult, train_predictor
from cachemgr.routing import decide


# (lookup would find a usable match, predictor said look up) -> confusion cell
_CONFUSION = {(True, True): "tp", (True, False): "fn", (False, True): "fp", (False, False): "tn"}


@dataclass(frozen=True)
class SimRequest:
    user: str
    prompt: str
    steps: int
    partition: str


@dataclass(frozen=True)
class PredictorConfig:
    min_samples: int = 200
    retrain_every: int = 1000      # requests between trainings (the beat period, in requests)
    nu: float = 0.1
    max_samples: int = 5000
    audit_fraction: float = 0.1


@dataclass(frozen=True)
class SimConfig:
    policy: Policy
    table: KTable
    budget_prompts: int = 0        # 0 = unbounded; else this many prompts' worth of items
    low_water: float = 0.9
    keep_recent_s: float = 0.0
    predictor: PredictorConfig | None = None
    seed: int = 0


@dataclass
class SimResult:
    requests: int = 0
    hits: int = 0
    steps_requested: int = 0
    steps_saved: int = 0
    k_histogram: Counter = field(default_factory=Counter)          # K (of 50) on hits
    hits_exact_repeat: int = 0
    hits_near: int = 0
    hits_same_user: int = 0        # both users known (the trace lacks them in places)
    hits_cross_user: int = 0
    hits_user_unknown: int = 0
    steps_saved_exact_repeat: int = 0
    steps_saved_same_user: int = 0
    evictions: int = 0
    max_items: int = 0
    lookups: int = 0
    predictor_confusion: Counter = field(default_factory=Counter)  # tp, fp, tn, fn
    hit_flags: list[bool] = field(default_factory=list)


class ExactIndex:
    """Exact cosine top-1 per partition over rows of one L2-normalised embedding matrix."""

    def __init__(self, embeddings: np.ndarray) -> None:
        self._embeddings = embeddings
        self._rows: dict[str, list[int]] = {}
        self._matrix: dict[str, np.ndarray] = {}
        self._position: dict[int, tuple[str, int]] = {}

    def add(self, partition: str, row: int) -> None:
        rows = self._rows.setdefault(partition, [])
        matrix = self._matrix.get(partition)
        if matrix is None or len(rows) == len(matrix):  # grow by doubling
            grown = np.empty((max(16, 2 * len(rows)), self._embeddings.shape[1]), np.float32)
            if matrix is not None:
                grown[: len(rows)] = matrix[: len(rows)]
            self._matrix[partition] = matrix = grown
        matrix[len(rows)] = self._embeddings[row]
        self._position[row] = (partition, len(rows))
        rows.append(row)

    def remove(self, row: int) -> None:
        partition, slot = self._position.pop(row)
        rows, matrix = self._rows[partition], self._matrix[partition]
        last = rows.pop()
        if last != row:  # move the last row into the hole
            rows[slot] = last
            matrix[slot] = matrix[len(rows)]
            self._position[last] = (partition, slot)

    def nearest(self, partition: str, vector: np.ndarray) -> tuple[int, float] | None:
        rows = self._rows.get(partition)
        if not rows:
            return None
        similarities = self._matrix[partition][: len(rows)] @ vector
        best = int(np.argmax(similarities))
        return rows[best], float(similarities[best])


def simulate(requests: Sequence[SimRequest], embeddings: np.ndarray, times: Sequence[float],
             config: SimConfig) -> SimResult:
    """Replay ``requests`` (row i of ``embeddings`` is request i's prompt) through the cache."""
    result = SimResult()
    index = ExactIndex(embeddings)
    items: dict[tuple[int, int], ItemStats] = {}
    stored: dict[int, set[int]] = {}
    first_seen: dict[tuple[str, str], int] = {}
    budget = Budget(max_items=5 * config.budget_prompts, low_water=config.low_water)
    predictor: MatchPredictor = AlwaysLookUp()
    samples: list[int] = []
    rng = random.Random(config.seed)

    for i, request in enumerate(requests):
        now, vector = float(times[i]), embeddings[i]
        result.requests += 1
        result.steps_requested += request.steps
        exact_key = (request.partition, request.prompt)
        if config.predictor and i and i % config.predictor.retrain_every == 0:
            trained = train_predictor(embeddings[samples[-config.predictor.max_samples:]],
                                      version=str(i), nu=config.predictor.nu,
                                      min_samples=config.predictor.min_samples)
            predictor = trained or predictor
        verdict = consult(predictor, vector, config.predictor.audit_fraction if config.predictor
                          else 0.0, rng.random)
        decision = None
        if config.policy.admits:
            result.lookups += verdict.look_up
            truth = decide(index.nearest(request.partition, vector),
                           lambda entry: frozenset(stored.get(entry, ())), config.table,
                           request.steps)
            if not isinstance(predictor, AlwaysLookUp):
                result.predictor_confusion[_CONFUSION[truth.resume, verdict.predicted_hit]] += 1
            if truth.resume:
                samples.append(i)
            decision = truth if verdict.look_up else None
        if decision is not None and decision.resume:
            entry, k = decision.entry, decision.k
            old = items[(entry, k)]
            items[(entry, k)] = ItemStats(entry, k, old.size, old.created_at, old.hits + 1, now)
            result.hits += 1
            result.steps_saved += k
            result.k_histogram[round(k * 50 / request.steps)] += 1
            exact = first_seen.get(exact_key) is not None
            users_known = bool(request.user) and bool(requests[entry].user)
            same_user = users_known and requests[entry].user == request.user
            result.hits_exact_repeat += exact
            result.hits_near += not exact
            result.hits_same_user += same_user
            result.hits_cross_user += users_known and not same_user
            result.hits_user_unknown += not users_known
            result.steps_saved_exact_repeat += k if exact else 0
            result.steps_saved_same_user += k if same_user else 0
            result.hit_flags.append(True)
        else:
            result.hit_flags.append(False)
            if config.policy.admits:
                ks = config.table.k_set(request.steps)
                for k in ks:
                    items[(i, k)] = ItemStats(i, k, 1, now, 0, now)
                if ks:
                    stored[i] = set(ks)
                    index.add(request.partition, i)
        first_seen.setdefault(exact_key, i)
        result.max_items = max(result.max_items, len(items))
        _, free_items = budget.excess(0, len(items))
        if free_items:
            for victim in select_victims(config.policy, list(items.values()), 0, free_items,
                                         now, config.keep_recent_s):
                del items[(victim.entry, victim.k)]
                stored[victim.entry].discard(victim.k)
                if not stored[victim.entry]:
                    del stored[victim.entry]
                    index.remove(victim.entry)
                result.evictions += 1
    return result


def top1_similarities(requests: Sequence[SimRequest], embeddings: np.ndarray) -> np.ndarray:
    """Each request's cosine similarity to the closest earlier request of its partition
    (NaN for the first of a partition): what a similarity -> K table acts on, before any
    eviction."""
    index = ExactIndex(embeddings)
    out = np.full(len(requests), np.nan, dtype=np.float32)
    for i, request in enumerate(requests):
        match = index.nearest(request.partition, embeddings[i])
        if match is not None:
            out[i] = match[1]
        index.add(request.partition, i)
    return out

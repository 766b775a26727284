"""The cache simulator: a trace through the project's own cache logic, generation simulated.

It runs the same pieces triage and the cache manager run (similarity -> K table over the
nearest few cached entries, hole handling, eviction policies, the match predictor, keeping
resumed jobs' latents) over precomputed prompt embeddings; a full job costs N steps and a
resume N - K. The vector search is an exact cosine search per partition over what is
cached (the live system asks Chroma; bench/replay checks their agreement). To make that
affordable on a whole trace, each request's most similar earlier prompts are found once in
blocked matrix products (``earlier_neighbours``); the nearest cached entries are then the
first of them still cached, and a scan of the cache is needed only when too few are and
the last is still above the table's lowest threshold.
Pure: numpy and the cache modules only; time is the requests' arrival times."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from cachemgr.ktable import KTable
from cachemgr.plan import (
    Query,
    ReuseRules,
    hit_kind,
    kept_ks,
    lineage_after,
    plan_exact,
    plan_reuse,
    teaches_predictor,
)
from cachemgr.policies import Budget, ItemStats, Policy, select_victims
from cachemgr.predictor import AlwaysLookUp, MatchPredictor, train_predictor
from cachemgr.routing import CachedEntry
from core.plan import CachePlan, Lineage, Route
from core.stepcache import OFF

# (lookup would find a usable match, predictor said look up) -> confusion cell
_CONFUSION = {(True, True): "tp", (True, False): "fn", (False, True): "fp", (False, False): "tn"}


@dataclass(frozen=True)
class SimRequest:
    user: str
    prompt: str
    steps: int
    partition: str
    seed: int = 0


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
    admit_resumed: bool = True     # a resumed job keeps its latents at the K set above its K
    keep_plans: bool = False       # SimResult.plans: every request's plan (for comparisons)
    rules: ReuseRules = ReuseRules()


@dataclass
class SimResult:
    requests: int = 0
    hits: int = 0
    steps_requested: int = 0
    steps_saved: int = 0
    k_histogram: Counter = field(default_factory=Counter)          # K (of 50) on resumes
    runs: Counter = field(default_factory=Counter)   # (N, the step it ran from) -> requests
    hits_by_kind: Counter = field(default_factory=Counter)         # cachemgr.plan.hit_kind
    steps_saved_by_kind: Counter = field(default_factory=Counter)
    hits_same_user: int = 0        # both users known (the trace lacks them in places)
    hits_cross_user: int = 0
    hits_user_unknown: int = 0
    steps_saved_same_user: int = 0
    evictions: int = 0
    max_items: int = 0
    lookups: int = 0
    predictor_confusion: Counter = field(default_factory=Counter)  # tp, fp, tn, fn
    hit_flags: list[bool] = field(default_factory=list)
    plans: list[CachePlan | None] = field(default_factory=list)   # with keep_plans


class ExactIndex:
    """Exact cosine nearest rows per partition of one L2-normalised embedding matrix;
    ties (copies of one prompt) go to the newest row first."""

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

    def vector(self, row: int) -> np.ndarray:
        return self._embeddings[row]

    def nearest(self, partition: str, vector: np.ndarray, n: int = 1) -> list[tuple[int, float]]:
        """Up to ``n`` (row, similarity), most similar first."""
        rows = self._rows.get(partition)
        if not rows:
            return []
        similarities = self._matrix[partition][: len(rows)] @ vector
        order = np.lexsort((-np.asarray(rows), -similarities))[:n]
        return [(rows[slot], float(similarities[slot])) for slot in order]


@dataclass(frozen=True)
class Neighbours:
    """Per request, the most similar distinct prompts seen earlier in its partition, most
    similar first. A key is one (partition, prompt); ``key_of[i]`` is request i's."""

    key_of: np.ndarray         # (n,) key id of each request
    keys: np.ndarray           # (n, k) key ids, -1 where fewer than k earlier keys exist
    similarities: np.ndarray   # (n, k) cosine similarities, -inf where keys is -1

    def top1(self) -> np.ndarray:
        """Each request's similarity to the closest earlier prompt (NaN: first of its
        partition): what a similarity -> K table acts on, before any eviction."""
        best = self.similarities[:, 0].astype(np.float32)
        best[self.keys[:, 0] < 0] = np.nan
        return best


def earlier_neighbours(requests: Sequence[SimRequest], embeddings: np.ndarray, k: int = 32,
                       block: int = 256,
                       progress: Callable[[int], object] | None = None) -> Neighbours:
    """Exact top-``k`` earlier keys for every request, by blocks of requests: one matrix
    product against the partition's keys first seen before the block's last request, the
    keys first seen after each row's own request masked out."""
    n = len(requests)
    key_ids: dict[tuple[str, str], int] = {}
    key_of = np.empty(n, np.int64)
    first_row: list[int] = []
    by_partition: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
        key = key_ids.setdefault((request.partition, request.prompt), len(key_ids))
        key_of[i] = key
        if key == len(first_row):
            first_row.append(i)
        by_partition.setdefault(request.partition, []).append(i)
    keys = np.full((n, k), -1, np.int64)
    similarities = np.full((n, k), -np.inf, np.float32)
    first_rows = np.asarray(first_row, np.int64)
    for partition_rows in by_partition.values():
        rows = np.asarray(partition_rows, np.int64)
        partition_keys = np.unique(key_of[rows])             # ids grow with first occurrence
        key_first = first_rows[partition_keys]
        key_matrix = embeddings[key_first]
        for start in range(0, len(rows), block):
            queries = rows[start:start + block]
            eligible = np.searchsorted(key_first, queries)    # keys first seen before the row
            width = int(eligible[-1])
            if width:
                scores = embeddings[queries] @ key_matrix[:width].T
                low = int(eligible[0])
                tail = scores[:, low:]
                tail[np.arange(low, width)[None, :] >= eligible[:, None]] = -np.inf
                take = min(k, width)
                best = (np.argpartition(-scores, take - 1, axis=1)[:, :take] if take < width
                        else np.broadcast_to(np.arange(width), scores.shape).copy())
                best_scores = np.take_along_axis(scores, best, 1)
                order = np.argsort(-best_scores, axis=1, kind="stable")
                best = np.take_along_axis(best, order, 1)
                best_scores = np.take_along_axis(best_scores, order, 1)
                found = np.isfinite(best_scores)
                keys[queries, :take] = np.where(found, partition_keys[best], -1)
                similarities[queries, :take] = best_scores
            if progress:
                progress(len(queries))
    return Neighbours(key_of, keys, similarities)


class CachedNearest:
    """Exact nearest cached entries, answered from precomputed neighbours."""

    def __init__(self, embeddings: np.ndarray, neighbours: Neighbours, floor: float) -> None:
        self._neighbours = neighbours
        self._floor = floor                          # below it no match can earn a K
        self._scan = ExactIndex(embeddings)
        self._entries: dict[int, list[int]] = {}     # key -> cached entry rows, oldest first

    def add(self, partition: str, row: int) -> None:
        self._scan.add(partition, row)
        self._entries.setdefault(int(self._neighbours.key_of[row]), []).append(row)

    def remove(self, row: int) -> None:
        self._scan.remove(row)
        key = int(self._neighbours.key_of[row])
        self._entries[key].remove(row)
        if not self._entries[key]:
            del self._entries[key]

    def nearest(self, row: int, partition: str, n: int) -> list[tuple[int, float]]:
        """Up to ``n`` cached (entry, similarity) for request ``row``, most similar first."""
        found: list[tuple[int, float]] = []
        keys, similarities = self._neighbours.keys[row], self._neighbours.similarities[row]
        for key, similarity in zip(keys.tolist(), similarities.tolist()):
            if key < 0:
                return found                         # every earlier key was looked at
            for entry in reversed(self._entries.get(key, ())):  # copies: the newest first
                found.append((entry, similarity))
                if len(found) == n:
                    return found
        if similarities[-1] < self._floor:
            return found                             # whatever else is cached scores lower
        return self._scan.nearest(partition, self._scan.vector(row), n)


class _AtRow:
    """The simulator's nearest-cached search, as plan_reuse asks an index, for one request
    (entries are request rows, as strings like the live index's ids)."""

    def __init__(self, index: CachedNearest, row: int) -> None:
        self._index, self._row = index, row

    def nearest(self, embedding: np.ndarray, partition: str,
                n: int) -> list[tuple[str, float]]:
        return [(str(entry), similarity)
                for entry, similarity in self._index.nearest(self._row, partition, n)]


def simulate(requests: Sequence[SimRequest], embeddings: np.ndarray, times: Sequence[float],
             config: SimConfig, neighbours: Neighbours | None = None) -> SimResult:
    """Replay ``requests`` (row i of ``embeddings`` is request i's prompt) through the cache.
    ``neighbours`` (from ``earlier_neighbours``) may be shared by runs on the same requests.
    Every finished image is kept, so an identical request always finds one (exact path)."""
    result = SimResult()
    neighbours = neighbours or earlier_neighbours(requests, embeddings)
    floor = min(threshold for threshold, _ in config.table.thresholds)
    index = CachedNearest(embeddings, neighbours, floor)
    items: dict[tuple[int, int], ItemStats] = {}
    stored: dict[int, set[int]] = {}
    lineages: dict[int, Lineage] = {}
    finished: dict[tuple[str, str, int], int] = {}   # identical requests -> first row
    # A prompt's worth of items: one per row of the table (a full generation's K set).
    budget = Budget(max_items=len(config.table.thresholds) * config.budget_prompts,
                    low_water=config.low_water)
    predictor: MatchPredictor = AlwaysLookUp()
    samples: list[int] = []
    rng = random.Random(config.seed)

    def entry_info(entry: str) -> CachedEntry | None:
        row = int(entry)
        return CachedEntry(frozenset(stored[row]), lineages[row]) if row in stored else None

    def admit(row: int, partition: str, ks: set[int] | frozenset[int], now: float) -> None:
        for k in ks:
            items[(row, k)] = ItemStats(row, k, 1, now, 0, now)
        if ks:
            stored[row] = set(ks)
            index.add(partition, row)

    for i, request in enumerate(requests):
        now, vector = float(times[i]), embeddings[i]
        result.requests += 1
        result.steps_requested += request.steps
        identical = (request.partition, request.prompt, request.seed)
        if config.predictor and i and i % config.predictor.retrain_every == 0:
            trained = train_predictor(embeddings[samples[-config.predictor.max_samples:]],
                                      version=str(i), nu=config.predictor.nu,
                                      min_samples=config.predictor.min_samples)
            if trained is not None:
                predictor = trained
        plan = None
        if config.policy.admits:
            plan = plan_exact(str(finished[identical]) if config.rules.exact and
                              identical in finished else None, request.steps, request.partition)
        if config.policy.admits and plan is None:
            query = Query(vector, request.partition, request.steps, request.seed)

            def plan_with(consulted: MatchPredictor, audit: float, row: int = i,
                          query: Query = query) -> CachePlan:
                return plan_reuse(query, _AtRow(index, row), entry_info,
                                  lambda segment: float(embeddings[int(segment.source)] @
                                                        query.embedding),
                                  config.table, consulted, audit, rng.random, config.rules)

            plan = plan_with(predictor, config.predictor.audit_fraction if config.predictor
                             else 0.0)
            result.lookups += plan.looked_up
            if not isinstance(predictor, AlwaysLookUp):  # measuring it: what a lookup finds
                truth = plan if plan.looked_up else plan_with(AlwaysLookUp(), 0.0)
                result.predictor_confusion[_CONFUSION[truth.route is Route.RESUME,
                                                      bool(plan.predicted_hit)]] += 1
            if teaches_predictor(plan):
                samples.append(i)
        if config.keep_plans:
            result.plans.append(plan)
        saved = 0
        if plan is not None and plan.route is not Route.FULL:
            entry, saved = int(plan.entry or 0), plan.steps_saved
            if plan.route is Route.RESUME:
                k = int(plan.k or 0)
                old = items[(entry, k)]
                items[(entry, k)] = ItemStats(entry, k, old.size, old.created_at, old.hits + 1,
                                              now)
                result.k_histogram[round(k * 50 / request.steps)] += 1
            result.hits += 1
            result.steps_saved += saved
            kind = hit_kind(plan, request.prompt, request.seed)
            result.hits_by_kind[kind] += 1
            result.steps_saved_by_kind[kind] += saved
            users_known = bool(request.user) and bool(requests[entry].user)
            same_user = users_known and requests[entry].user == request.user
            result.hits_same_user += same_user
            result.hits_cross_user += users_known and not same_user
            result.hits_user_unknown += not users_known
            result.steps_saved_same_user += saved if same_user else 0
            result.hit_flags.append(True)
        else:
            result.hit_flags.append(False)
        result.runs[(request.steps, saved)] += 1   # the exact path: from N, no step run
        if config.policy.admits:
            kept = kept_ks(plan, config.table, request.steps, config.admit_resumed,
                           config.rules)
            if kept:
                lineages[i] = lineage_after(plan, str(i), request.prompt, request.steps,
                                            request.seed, OFF)
            admit(i, request.partition, kept, now)
        if plan is None or plan.route is not Route.EXACT:
            finished.setdefault(identical, i)
        result.max_items = max(result.max_items, len(items))
        _, free_items = budget.excess(0, len(items))
        if free_items:
            for victim in select_victims(config.policy, list(items.values()), 0, free_items,
                                         now, config.keep_recent_s):
                row = int(victim.entry)
                del items[(row, victim.k)]
                stored[row].discard(victim.k)
                if not stored[row]:
                    del stored[row]
                    del lineages[row]
                    index.remove(row)
                result.evictions += 1
    return result

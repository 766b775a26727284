"""Triage: decide where a job runs and hand it to that GPU queue. Runs on CPU workers."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cachemgr.catalog import Catalog
from cachemgr.keys import request_partition
from cachemgr.ktable import KTable
from cachemgr.plan import plan_reuse, teaches_predictor
from cachemgr.predictor import MatchPredictor
from cachemgr.vectors import VectorIndex
from core.errors import InvalidRequest, InvalidTransition, VectorIndexUnavailable
from core.jobs import JobRecord, JobState, RequestLimits, parse_request
from core.jobstore import JobStore
from core.plan import FULL_CACHE_OFF, CachePlan, Reason, Route
from workers.app import FULL_TASK, RESUME_TASK
from workers.embedder import Embedder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Triaged:
    """Triage's result for one job: the plan, and the time its parts took (ms)."""

    plan: CachePlan
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def task(self) -> str:
        """The generation task (and queue) the plan needs."""
        return RESUME_TASK if self.plan.route is Route.RESUME else FULL_TASK


Decide = Callable[[JobRecord], Triaged]


def full_generation_only(record: JobRecord) -> Triaged:
    """The route when no cache is consulted."""
    return Triaged(FULL_CACHE_OFF)


@dataclass
class CacheRouter:
    """Embed the prompt, then plan its reuse (cachemgr.plan: predictor, the nearest cached
    prompts of the job's partition in Chroma, their stored Ks in the catalog, K)."""

    embedder: Embedder
    vectors: VectorIndex
    catalog: Catalog
    table: KTable
    predictor: MatchPredictor
    model: str
    scheduler: str
    shared: bool                   # one cache for all tenants (T2I_CACHE_SCOPE=shared)
    add_sample: Callable[[np.ndarray], None] = lambda embedding: None
    audit_fraction: float = 0.0
    draw: Callable[[], float] = random.random

    def __call__(self, record: JobRecord) -> Triaged:
        request = record.request
        partition = request_partition(self.model, self.scheduler, request, record.tenant,
                                      self.shared)
        started = time.perf_counter()
        embedding = self.embedder.embed([request.prompt])[0]
        embedded = time.perf_counter()
        plan = plan_reuse(embedding, partition, request.steps, self.vectors,
                          self.catalog.stored_ks, self.table, self.predictor,
                          self.audit_fraction, self.draw)
        planned = time.perf_counter()
        if plan.reason is Reason.INDEX_UNAVAILABLE:
            log.warning("job %s: vector index unavailable; full generation", record.id)
        if teaches_predictor(plan):
            self.add_sample(embedding)
        return Triaged(plan, {"embed_ms": round((embedded - started) * 1e3, 3),
                              "lookup_ms": round((planned - embedded) * 1e3, 3)})


def triage_job(job_id: str, jobs: JobStore, limits: RequestLimits, decide: Decide,
               enqueue: Callable[..., None], now: Callable[[], float]) -> dict[str, Any]:
    """Validate, decide the route, record it, enqueue the generation. Safe to redeliver."""
    record = jobs.get(job_id)
    if record.state.terminal or record.state is JobState.GENERATING:
        log.info("job %s: triage skipped, job already %s", job_id, record.state)
        return {"job_id": job_id, "skipped": str(record.state)}
    if record.state is JobState.QUEUED and record.route:
        # Routed before, but the worker died before this message was acked: the generation
        # message may not have been sent. Sending it again is safe (generation is idempotent).
        enqueue(record.route, job_id)
        return {"job_id": job_id, "route": record.route, "resent": True}
    try:
        jobs.update(job_id, lambda r: r.transition(JobState.TRIAGE, triage_started_at=now()))
        try:
            parse_request(asdict(record.request), limits, random_seed=record.request.seed)
        except InvalidRequest as exc:
            reason = f"invalid request: {exc}"
            jobs.update(job_id, lambda r: r.transition(JobState.FAILED, error=reason,
                                                        finished_at=now()))
            log.warning("job %s: refused at triage: %s", job_id, exc)
            return {"job_id": job_id, "failed": str(exc)}
        triaged = decide(record)
        jobs.update(job_id, lambda r: r.transition(
            JobState.QUEUED, route=triaged.task, plan=triaged.plan, triage_finished_at=now(),
            extra={**r.extra, **triaged.timings}))
    except InvalidTransition:
        log.info("job %s: cancelled during triage", job_id)
        return {"job_id": job_id, "skipped": "cancelled"}
    enqueue(triaged.task, job_id)
    log.info("job %s: routed to %s (%s)", job_id, triaged.task, triaged.plan.reason)
    return {"job_id": job_id, "route": triaged.task, "reason": str(triaged.plan.reason)}


def register_entry(entry: str, partition: str, sizes: dict[int, int], jobs: JobStore,
                   embedder: Embedder, vectors: VectorIndex, catalog: Catalog,
                   now: Callable[[], float]) -> dict[str, Any]:
    """Make a finished generation findable: items in the catalog first, then the vector, so a
    lookup that finds the vector also finds its items. Safe to redeliver. The prompt is read
    from the entry's job record. An index that fails leaves the vector to the cache sweep,
    which re-indexes catalog entries without one: no retry holds up the shared worker."""
    prompt = jobs.get(entry).request.prompt
    created = now()
    added = catalog.register(entry, partition, sizes, created, prompt)
    try:
        vectors.add(entry, embedder.embed([prompt])[0], partition, prompt, created)
    except VectorIndexUnavailable as exc:
        log.warning("job %s: latents cached, vector left to the sweep: %s", entry, exc)
        return {"entry": entry, "items": sorted(sizes), "new": added, "indexed": False}
    log.info("job %s: cached %d latents (K %s)", entry, added, sorted(sizes))
    return {"entry": entry, "items": sorted(sizes), "new": added, "indexed": True}

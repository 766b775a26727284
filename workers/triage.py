"""Triage: decide where a job runs and hand it to that GPU queue. Runs on CPU workers."""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from cachemgr.catalog import Catalog
from cachemgr.identical import IdenticalRequests
from cachemgr.keys import identical_key, request_partition
from cachemgr.ktable import KTable
from cachemgr.plan import Query, lineage_after, plan_exact, plan_reuse, teaches_predictor
from cachemgr.predictor import MatchPredictor
from cachemgr.vectors import VectorIndex
from core.addons import active_from
from core.errors import (
    InvalidRequest,
    InvalidTransition,
    JobNotFound,
    ObjectMissing,
    VectorIndexUnavailable,
)
from core.jobs import JobRecord, JobRequest, JobState, RequestLimits, image_key, parse_request
from core.jobstore import JobStore
from core.objectstore import ObjectStore
from core.plan import FULL_CACHE_OFF, CachePlan, Reason, Route, Segment
from core.stepcache import OFF
from workers.app import FULL_TASK, RESUME_TASK
from workers.embedder import Embedder
from workers.queues import affinity_queue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Triaged:
    """Triage's result for one job: the plan, and the time its parts took (ms)."""

    plan: CachePlan
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def task(self) -> str:
        """The generation task (and queue) the plan needs ('' for the exact path: none)."""
        return {Route.RESUME: RESUME_TASK, Route.FULL: FULL_TASK}.get(self.plan.route, "")


Decide = Callable[[JobRecord], Triaged]


def full_generation_only(record: JobRecord) -> Triaged:
    """The route when no cache is consulted."""
    return Triaged(FULL_CACHE_OFF)


# How many earlier prompts of lineages triage keeps embedded (a chain's prompts recur).
ANCESTOR_EMBEDDINGS_KEPT = 4096


@dataclass
class CacheRouter:
    """Serve an identical finished request's image, or share an identical one's generation
    in flight; otherwise embed the prompt and plan its reuse (cachemgr.plan: predictor, the
    nearest cached prompts of the job's partition in Chroma, their stored Ks and lineage in
    the catalog, the seed policy, K)."""

    embedder: Embedder
    vectors: VectorIndex
    catalog: Catalog
    identical: IdenticalRequests
    objects: ObjectStore
    jobs: JobStore
    table: KTable
    predictor: MatchPredictor
    model: str
    scheduler: str
    shared: bool                   # one cache for all tenants (T2I_CACHE_SCOPE=shared)
    step_cache: str = OFF          # the GPU workers' (core.stepcache spec): part of the partition
    lora_from: float = 0.0         # T2I_LORA_FROM: LoRA jobs may resume base-model latents to there
    add_sample: Callable[[np.ndarray], None] = lambda embedding: None
    audit_fraction: float = 0.0
    draw: Callable[[], float] = random.random
    _ancestors: OrderedDict[str, np.ndarray] = field(default_factory=OrderedDict)

    def __call__(self, record: JobRecord) -> Triaged:
        request = record.request
        partition = request_partition(self.model, self.scheduler, self.step_cache, request,
                                      record.tenant, self.shared, self.lora_from)
        digest = identical_key(partition, request)
        shortcut = self._identical(record.id, digest, partition, request.steps)
        if shortcut is not None:
            return Triaged(shortcut)
        started = time.perf_counter()
        embedding = self.embedder.embed([request.prompt])[0]
        embedded = time.perf_counter()
        base = None
        if request.loras:
            base = (request_partition(self.model, self.scheduler, self.step_cache,
                                      replace(request, loras=()), record.tenant, self.shared),
                    active_from(request.steps, self.lora_from))
        plan = plan_reuse(Query(embedding, partition, request.steps, request.seed, base),
                          self.vectors, self.catalog.entry,
                          lambda segment: float(self._embedding(segment) @ embedding),
                          self.table, self.predictor, self.audit_fraction, self.draw)
        planned = time.perf_counter()
        if plan.reason is Reason.INDEX_UNAVAILABLE:
            log.warning("job %s: vector index unavailable; full generation", record.id)
        if teaches_predictor(plan):
            self.add_sample(embedding)
        return Triaged(plan, {"embed_ms": round((embedded - started) * 1e3, 3),
                              "lookup_ms": round((planned - embedded) * 1e3, 3)})

    def _identical(self, job_id: str, digest: str, partition: str, steps: int,
                   retried: bool = False) -> CachePlan | None:
        """The exact path (an identical request's image still stored), or following an
        identical request being generated; None when this job must generate (it leads)."""
        source = self.identical.finished(digest)
        if source is not None and source != job_id:
            if self.objects.exists(image_key(source)):
                return plan_exact(source, steps, partition)
            self.identical.forget(digest, source)
        leader = self.identical.lead(digest, job_id)
        if leader != job_id and not self._live(leader):
            leader = self.identical.lead(digest, job_id, replacing=leader)
        if leader == job_id:
            return None
        self.identical.follow(leader, job_id)
        if not self._live(leader) and not retried:  # it ended before it saw this follower
            return self._identical(job_id, digest, partition, steps, retried=True)
        return CachePlan(Route.EXACT, Reason.IN_FLIGHT, partition=partition, entry=leader)

    def _live(self, job_id: str) -> bool:
        try:
            return not self.jobs.get(job_id).state.terminal
        except JobNotFound:
            return False

    def _embedding(self, segment: Segment) -> np.ndarray:
        """An earlier prompt of a lineage, embedded once (most recently used kept)."""
        vector = self._ancestors.pop(segment.prompt, None)
        if vector is None:
            vector = self.embedder.embed([segment.prompt])[0]
        self._ancestors[segment.prompt] = vector
        while len(self._ancestors) > ANCESTOR_EMBEDDINGS_KEPT:
            self._ancestors.popitem(last=False)
        return vector


def serve_exact(job_id: str, plan: CachePlan, jobs: JobStore, objects: ObjectStore,
                now: Callable[[], float]) -> dict[str, Any]:
    """Answer with an identical finished request's image: a copy under this job's own key
    and a record of its own, no denoising step."""
    source = str(plan.entry)
    objects.put(image_key(job_id), objects.get(image_key(source)), content_type="image/png")
    finished = now()
    jobs.update(job_id, lambda r: r.transition(
        JobState.SUCCEEDED, plan=plan, image_key=image_key(job_id), triage_finished_at=finished,
        finished_at=finished, extra={**r.extra, "unet_calls": 0}))
    log.info("job %s: identical to finished job %s; its image served", job_id, source)
    return {"job_id": job_id, "state": "succeeded", "exact": source}


def triage_job(job_id: str, jobs: JobStore, limits: RequestLimits, decide: Decide,
               enqueue: Callable[..., None], now: Callable[[], float],
               objects: ObjectStore,
               prefer: Callable[[JobRequest], str | None] = lambda request: None
               ) -> dict[str, Any]:
    """Validate, decide the route, record it, enqueue the generation (or serve the exact
    path; or, following an identical job in flight, wait for its worker to send this one
    back here). A GPU worker that ``prefer`` names (one holding the job's LoRAs,
    core.affinity) gets the job in its own queue. Safe to redeliver."""
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
            parse_request(record.request.payload(), limits, random_seed=record.request.seed)
        except InvalidRequest as exc:
            reason = f"invalid request: {exc}"
            jobs.update(job_id, lambda r: r.transition(JobState.FAILED, error=reason,
                                                        finished_at=now()))
            log.warning("job %s: refused at triage: %s", job_id, exc)
            return {"job_id": job_id, "failed": str(exc)}
        triaged = decide(record)
        if triaged.plan.reason is Reason.EXACT_REPEAT:
            try:
                return serve_exact(job_id, triaged.plan, jobs, objects, now)
            except ObjectMissing:  # deleted since triage saw it: generate after all
                triaged = decide(record)
        worker = prefer(record.request) if triaged.task else None
        placed = {"affinity": worker} if worker else {}
        jobs.update(job_id, lambda r: r.transition(
            JobState.QUEUED, route=triaged.task, plan=triaged.plan, triage_finished_at=now(),
            extra={**r.extra, **triaged.timings, **placed}))
    except InvalidTransition:
        log.info("job %s: cancelled during triage", job_id)
        return {"job_id": job_id, "skipped": "cancelled"}
    if not triaged.task:
        log.info("job %s: waits for identical job %s in flight", job_id, triaged.plan.entry)
        return {"job_id": job_id, "follows": triaged.plan.entry}
    if worker:
        enqueue(triaged.task, job_id, queue=affinity_queue(worker))
    else:
        enqueue(triaged.task, job_id)
    log.info("job %s: routed to %s (%s)%s", job_id, triaged.task, triaged.plan.reason,
             f" at {worker}, which holds its LoRAs" if worker else "")
    return {"job_id": job_id, "route": triaged.task, "reason": str(triaged.plan.reason),
            **({"worker": worker} if worker else {})}


def register_entry(entry: str, partition: str, sizes: dict[int, int], jobs: JobStore,
                   embedder: Embedder, vectors: VectorIndex, catalog: Catalog,
                   now: Callable[[], float]) -> dict[str, Any]:
    """Make a finished generation findable: items (and the lineage of their steps) in the
    catalog first, then the vector, so a lookup that finds the vector also finds its items.
    Safe to redeliver. The prompt and plan are read from the entry's job record. An index
    that fails leaves the vector to the cache sweep, which re-indexes catalog entries
    without one: no retry holds up the shared worker."""
    record = jobs.get(entry)
    prompt, created = record.request.prompt, now()
    lineage = lineage_after(record.plan, entry, prompt, record.request.steps,
                            record.request.seed, record.extra.get("step_cache", OFF))
    added = catalog.register(entry, partition, sizes, created, prompt, lineage)
    try:
        vectors.add(entry, embedder.embed([prompt])[0], partition, prompt, created)
    except VectorIndexUnavailable as exc:
        log.warning("job %s: latents cached, vector left to the sweep: %s", entry, exc)
        return {"entry": entry, "items": sorted(sizes), "new": added, "indexed": False}
    log.info("job %s: cached %d latents (K %s)", entry, added, sorted(sizes))
    return {"entry": entry, "items": sorted(sizes), "new": added, "indexed": True}

"""Generation on GPU workers: run the engine, store the image, finish the job record, and
(with the cache on) keep the latents of generations and resume from them. A resumed job
keeps only its latents above the K it resumed from: below it, it ran none of its own. A
finished job also answers the identical requests that waited for it (single flight)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cachemgr.catalog import Catalog
from cachemgr.identical import IdenticalRequests
from cachemgr.keys import identical_key, latent_key, request_partition
from cachemgr.ktable import KTable
from cachemgr.plan import kept_ks
from core.backoff import backoff_s
from core.errors import (
    BrokerUnavailable,
    CorruptLatent,
    InvalidTransition,
    JobCancelled,
    ObjectMissing,
    ObjectStoreUnavailable,
    T2IError,
)
from core.jobs import JobRecord, JobState, image_key
from core.jobstore import JobStore
from core.objectstore import ObjectStore
from core.plan import CachePlan
from core.stepcache import OFF
from core.webhooks import Event
from workers.engine import DenoisingEngine, Generation
from workers.latents import load_latent, save_latents

log = logging.getLogger(__name__)

RegisterEntry = Callable[[str, str, dict[int, int]], None]
"""(entry id = job id, partition, {K: bytes}) -> None: hands a new entry to the catalog (the
prompt stays in the job record: messages carry ids only)."""


@dataclass(frozen=True)
class Reliability:
    """How a GPU worker treats faults that are not the job's own."""

    max_deliveries: int = 3          # worker deaths a job may cause before it is failed
    store_outage_s: float = 120.0    # how long a finished image waits for the object store
    sleep: Callable[[float], None] = time.sleep


@dataclass(frozen=True)
class CacheConfig:
    """What a GPU worker needs to know to write and read the cache."""

    model: str
    scheduler: str
    shared: bool                   # one cache for all tenants (T2I_CACHE_SCOPE=shared)
    table: KTable
    catalog: Catalog
    register: RegisterEntry
    identical: IdenticalRequests
    retriage: Callable[[str], None]  # sends a job (a follower) back to triage
    admit_resumed: bool = True     # T2I_CACHE_ADMIT_RESUMED
    step_cache: str = OFF          # the engine's (core.stepcache spec): part of the partition
    lora_from: float = 0.0         # T2I_LORA_FROM: part of a LoRA job's partition

    def partition(self, record: JobRecord) -> str:
        return request_partition(self.model, self.scheduler, self.step_cache, record.request,
                                 record.tenant, self.shared, self.lora_from)

    def land(self, record: JobRecord, succeeded: bool) -> None:
        """The job ended: if it succeeded, identical requests get its image from now on;
        either way the identical requests that waited for it go back to triage (they are
        served its image, or one of them generates). Never fails the job: a follower it
        misses is sent back by the reconciler."""
        digest = identical_key(self.partition(record), record.request)
        try:
            if succeeded:
                self.identical.remember(digest, record.id)
            followers = self.identical.land(digest, record.id)
            for follower in followers:
                self.retriage(follower)
        except T2IError as exc:
            log.warning("job %s: identical requests not told: %s", record.id, exc)
            return
        if followers:
            log.info("job %s: %d identical jobs sent back to triage", record.id, len(followers))

    def kept(self, plan: CachePlan | None, steps: int) -> frozenset[int]:
        """The Ks a job keeps (cachemgr.plan.kept_ks; None: it runs in full)."""
        return kept_ks(plan, self.table, steps, self.admit_resumed)


def start_generation(job_id: str, jobs: JobStore, now: Callable[[], float],
                     reliability: Reliability) -> JobRecord | None:
    """The job, if it may run; None when it must not (finished, cancelled, or a poison job:
    its message came back after it was being generated ``max_deliveries`` times, so its
    workers died, most likely because of the job itself). It becomes GENERATING only when
    the engine starts it (``on_join``)."""
    record = jobs.get(job_id)
    if record.state.terminal:
        log.info("job %s: generation skipped, job already %s", job_id, record.state)
        return None
    if record.state is JobState.GENERATING and record.deliveries >= reliability.max_deliveries:
        error = (f"its worker died during each of {record.deliveries} deliveries "
                 f"(last on {record.worker}); not retried")
        jobs.fail(job_id, error, now())
        log.error("job %s: failed: %s", job_id, error)
        return None
    if record.cancel_requested:
        jobs.update(job_id, lambda r: r.transition(JobState.CANCELLED, finished_at=now(),
                                                    error="cancelled by request"))
        return None
    return record


@dataclass
class Joining:
    """What the engine calls as a job starts running (alone: at once; batched: when it joins
    a batch), before its cached latent is fetched: the job becomes GENERATING and counts a
    delivery then, so a job still waiting for a batch when its worker dies is not taken for
    the poison, and a fetch that kills the worker is counted. A fallback to a full run in the
    same delivery joins again without counting."""

    job_id: str
    jobs: JobStore
    model_label: str
    worker: str
    now: Callable[[], float]
    counted: bool = False

    def at(self, total_steps: int) -> Callable[[], None]:
        """The join callback for a run of ``total_steps`` steps. It raises JobCancelled if
        the job was cancelled while it waited, InvalidTransition if it ended otherwise."""
        def join() -> None:
            extra = 0 if self.counted else 1
            try:
                self.jobs.update(self.job_id, lambda r: r.transition(
                    JobState.GENERATING, generation_started_at=self.now(), step=0,
                    total_steps=total_steps, deliveries=r.deliveries + extra,
                    worker=self.worker, model=self.model_label))
            except InvalidTransition as exc:
                current = self.jobs.get(self.job_id)
                if current.state is JobState.CANCELLED or current.cancel_requested:
                    raise JobCancelled(self.job_id) from exc
                raise
            self.counted = True
        return join


def redelivered(record: JobRecord) -> bool:
    """A job whose earlier run ended with its worker: it runs alone (core.batching)."""
    return record.deliveries > 0


def wants_progress(record: JobRecord) -> bool:
    return Event.PROGRESS in record.wanted_events


REPORT_PAUSE_S = 5.0  # after a failed progress report, steps go unreported this long


def step_reporter(job_id: str, jobs: JobStore, now: Callable[[], float] = time.monotonic,
                  progress_webhook: bool = False) -> Callable[[int, int], None]:
    """Per-step progress (and its webhook, when the job wants progress events); raises
    JobCancelled at the next step after a cancel request.
    While Redis is down the steps go on unreported: the work is not thrown away for an
    outage, and the finished job waits for Redis (JobStore's outage budget). After a failed
    report the next ones are skipped for REPORT_PAUSE_S, so a Redis that does not answer
    (a partition: each call waits for its timeout) does not hold every step of a batch."""
    unreported, paused_until = False, 0.0

    def on_step(step: int, total: int) -> None:
        nonlocal unreported, paused_until
        if now() < paused_until:
            return
        try:
            cancelled = jobs.report_progress(job_id, step, total, progress_webhook)
        except BrokerUnavailable as exc:
            if not unreported:
                log.warning("job %s: progress not reported from step %d on: %s", job_id,
                            step, exc)
            unreported, paused_until = True, now() + REPORT_PAUSE_S
            return
        if unreported:
            log.info("job %s: progress reported again at step %d", job_id, step)
            unreported = False
        if cancelled:
            raise JobCancelled(job_id)
    return on_step


def finish_cancelled(record: JobRecord, jobs: JobStore, now: Callable[[], float],
                     cache: CacheConfig | None) -> dict[str, Any]:
    """Cancelled while generating, or (already marked) while waiting for a batch."""
    jobs.update(record.id, lambda r: r if r.state.terminal else r.transition(
        JobState.CANCELLED, finished_at=now(), error="cancelled by request"))
    log.info("job %s: cancelled during generation", record.id)
    if cache:
        cache.land(record, succeeded=False)
    return {"job_id": record.id, "state": "cancelled"}


def _put_waiting(job_id: str, key: str, png: bytes, objects: ObjectStore,
                 now: Callable[[], float], reliability: Reliability) -> float:
    """Put the image, waiting out an object-store outage of up to ``store_outage_s`` rather
    than losing the work done; returns the seconds waited."""
    started, attempt = now(), 0
    while True:
        try:
            objects.put(key, png, content_type="image/png")
            return now() - started
        except ObjectStoreUnavailable as exc:
            delay = backoff_s(attempt, 0.5, 10.0)
            if now() - started + delay > reliability.store_outage_s:
                raise
            log.warning("job %s: image not stored yet (%s); retrying in %.1fs", job_id, exc, delay)
            reliability.sleep(delay)
            attempt += 1


def store_image(job_id: str, png: bytes, jobs: JobStore, objects: ObjectStore,
                now: Callable[[], float], reliability: Reliability,
                **fields: Any) -> dict[str, Any]:
    """Write the image under its deterministic key and mark the job succeeded."""
    key = image_key(job_id)
    waited = _put_waiting(job_id, key, png, objects, now, reliability)
    if waited >= 0.5:  # at least one retry (the first waits 0.5 s): tell the poller
        fields["waited_for_object_store_s"] = round(waited, 1)
    finished = now()
    jobs.update(job_id, lambda r: r.transition(
        JobState.SUCCEEDED, image_key=key, generation_finished_at=finished, finished_at=finished,
        step=r.total_steps, extra={**r.extra, **fields}))
    log.info("job %s: succeeded, image %s", job_id, key)
    return {"job_id": job_id, "state": "succeeded", "image_key": key}


def _cache_entry(record: JobRecord, captured: dict[int, torch.Tensor], objects: ObjectStore,
                 cache: CacheConfig) -> None:
    """Store a finished generation's latents and register them; never fails the job."""
    job_id, partition = record.id, cache.partition(record)
    sizes = save_latents(objects, partition, job_id, captured)
    if not sizes:
        return
    try:
        cache.register(job_id, partition, sizes)
    except T2IError as exc:
        log.warning("job %s: entry not registered: %s", job_id, exc)


def _forget_item(job_id: str, partition: str, entry: str, k: int, objects: ObjectStore,
                 cache: CacheConfig) -> None:
    """Drop a missing or corrupt latent's item, so triage stops offering it (the sweep
    removes the entry's vector once it has no item left); never fails the job."""
    try:
        cache.catalog.remove_item(entry, k)
        objects.delete(latent_key(partition, entry, k))
    except T2IError as exc:
        log.warning("job %s: unusable item %s/K=%d not dropped: %s", job_id, entry, k, exc)


def made_by(result: Generation) -> dict[str, Any]:
    """What the job record keeps of how its image was computed (the lineage of its cached
    latents takes the step cache from here)."""
    return {"unet_calls": result.unet_calls, "shallow_unet_calls": result.shallow_unet_calls,
            "step_cache": result.step_cache, "batch_peak": result.batch_peak,
            "adapter_wait_ms": round(result.adapter_wait_s * 1000, 1)}


def _run_full(record: JobRecord, jobs: JobStore, objects: ObjectStore,
              engine: DenoisingEngine, joining: Joining, now: Callable[[], float],
              cache: CacheConfig | None, reliability: Reliability,
              **fields: Any) -> dict[str, Any]:
    job_id, request = record.id, record.request
    capture = cache.kept(None, request.steps) if cache else frozenset()
    try:
        result: Generation = engine.generate(
            request, step_reporter(job_id, jobs, progress_webhook=wants_progress(record)),
            capture, alone=redelivered(record), on_join=joining.at(request.steps))
    except JobCancelled:
        return finish_cancelled(record, jobs, now, cache)
    except InvalidTransition:   # it ended while it waited for a batch
        return _skipped(job_id, jobs, cache)
    outcome = store_image(job_id, result.image_png, jobs, objects, now, reliability,
                          **made_by(result), **fields)
    if cache:
        cache.land(record, succeeded=True)
        if result.captured:
            _cache_entry(record, result.captured, objects, cache)
    return outcome


def _skipped(job_id: str, jobs: JobStore, cache: CacheConfig | None) -> dict[str, Any]:
    """A job not to run (finished or cancelled while queued, or poison): identical jobs
    that waited for it go back to triage now, not when the reconciler finds them."""
    if cache:
        record = jobs.get(job_id)
        cache.land(record, succeeded=record.state is JobState.SUCCEEDED)
    return {"job_id": job_id, "skipped": True}


def generate_full(job_id: str, jobs: JobStore, objects: ObjectStore,
                  engine: DenoisingEngine, worker: str, now: Callable[[], float], cache: CacheConfig | None,
                  reliability: Reliability) -> dict[str, Any]:
    record = start_generation(job_id, jobs, now, reliability)
    if record is None:
        return _skipped(job_id, jobs, cache)
    return _run_full(record, jobs, objects, engine,
                     Joining(job_id, jobs, engine.label, worker, now), now, cache, reliability)


def generate_resume(job_id: str, jobs: JobStore, objects: ObjectStore,
                    engine: DenoisingEngine, worker: str, now: Callable[[], float], cache: CacheConfig | None,
                    reliability: Reliability) -> dict[str, Any]:
    """Resume from the cached (entry, K) triage chose; an unusable latent falls back to a
    full generation inside the same job."""
    if cache is None:  # the cache was switched off after triage routed this job
        return generate_full(job_id, jobs, objects, engine, worker, now, None, reliability)
    record = jobs.get(job_id)
    plan = record.plan
    if plan is None or plan.entry is None or plan.k is None:  # nothing to resume from
        return generate_full(job_id, jobs, objects, engine, worker, now, cache, reliability)
    entry, k, partition = plan.entry, plan.k, plan.partition
    started = start_generation(job_id, jobs, now, reliability)
    if started is None:
        return _skipped(job_id, jobs, cache)
    record = started
    request = record.request
    joining = Joining(job_id, jobs, engine.label, worker, now)
    fetch_ms: list[float] = []

    def fetch() -> torch.Tensor:
        fetch_started = time.perf_counter()
        latent = load_latent(objects, partition, entry, k, engine.latent_shape(request))
        fetch_ms.append(round((time.perf_counter() - fetch_started) * 1e3, 3))
        return latent

    capture = cache.kept(plan, request.steps)
    try:
        on_step = step_reporter(job_id, jobs, progress_webhook=wants_progress(record))
        result = engine.resume(request, fetch, k, on_step, capture, plan.reseed,
                               alone=redelivered(record),
                               on_join=joining.at(request.steps - plan.steps_saved))
    except (ObjectMissing, CorruptLatent, ObjectStoreUnavailable) as exc:
        reason = f"latent {entry}/K={k} unusable: {exc}"
        log.warning("job %s: %s; falling back to full generation", job_id, reason)
        if not isinstance(exc, ObjectStoreUnavailable):  # an outage passes; this will not
            _forget_item(job_id, partition, entry, k, objects, cache)
        return _run_full(record, jobs, objects, engine, joining, now, cache, reliability,
                         fallback=reason)
    except JobCancelled:
        return finish_cancelled(record, jobs, now, cache)
    except InvalidTransition:   # it ended while it waited for a batch
        return _skipped(job_id, jobs, cache)
    try:
        hits = cache.catalog.record_hit(entry, k, now())
    except BrokerUnavailable as exc:  # a lost hit only lowers one eviction score a little
        hits = None
        log.warning("job %s: hit on %s K=%d not counted: %s", job_id, entry, k, exc)
    log.info("job %s: resumed from %s K=%d (hit %s)", job_id, entry, k, hits)
    outcome = store_image(job_id, result.image_png, jobs, objects, now, reliability,
                          **made_by(result), resumed_from_k=k, latent_fetch_ms=fetch_ms[0])
    cache.land(record, succeeded=True)
    if result.captured:
        _cache_entry(record, result.captured, objects, cache)
    return outcome

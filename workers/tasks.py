"""Celery tasks: thin glue that unpacks ids, calls one function and returns a small dict.

Failures: a transient one (a store briefly down) is retried in place with backoff; anything
else fails the job with its reason, so the worker moves on and the poller learns why.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from celery import Task, signals
from celery.exceptions import SoftTimeLimitExceeded

from core.backoff import backoff_s
from core.errors import BrokerUnavailable, JobNotFound, T2IError, TransientError
from core.jobs import RequestLimits
from core.logs import enter_job, leave_job
from core.logs import install as install_log_format
from core.metrics import sample
from workers import runtime
from workers.app import (
    EVICT_TASK,
    FULL_TASK,
    RECONCILE_TASK,
    REGISTER_TASK,
    RESUME_TASK,
    SWEEP_TASK,
    TRAIN_PREDICTOR_TASK,
    TRIAGE_TASK,
    WEBHOOK_SWEEP_TASK,
    WEBHOOK_TASK,
    app,
    enqueue,
)
from workers.lease import occupancy
from workers.queues import FULL, JOB_QUEUES, RESUME, TRIAGE, affinity_queue

log = logging.getLogger(__name__)

MAX_RETRIES = 3
T = TypeVar("T")


@signals.worker_process_init.connect
def load_models_in_pool_process(**_: Any) -> None:
    """Load what this worker's queues need once per pool process, after the fork (CUDA must
    not cross a fork), so the first job does not pay for it."""
    queues = set(app.amqp.queues.consume_from or ())
    try:
        if queues & {FULL, RESUME}:
            runtime.engine()
        if TRIAGE in queues:
            runtime.router()
    except T2IError:
        log.exception("preloading failed; jobs will report the error")


@signals.celeryd_after_setup.connect
def consume_own_queue(sender: str, instance: Any, **_: Any) -> None:
    """A GPU worker also takes jobs from a queue of its own, named after its node (Celery's
    way to add a queue after -Q): LoRA jobs triage sends it for the LoRAs it holds."""
    queues = instance.app.amqp.queues
    if set(queues.consume_from or ()) & {FULL, RESUME}:
        queues.select_add(affinity_queue(sender))


@signals.worker_ready.connect
def load_engine_in_thread_pool(sender: Any = None, **_: Any) -> None:
    """A batching GPU worker (T2I_GPU_BATCH > 1, `-P threads`) runs its tasks on threads of
    this process, where no pool process starts: load the engine here instead. (Never in a
    prefork parent: CUDA must not cross a fork.)"""
    queues = set(app.amqp.queues.consume_from or ())
    threads_pool = type(getattr(sender, "pool", None)).__module__ == "celery.concurrency.thread"
    if runtime.settings().gpu_batch > 1 and queues & {FULL, RESUME} and not threads_pool:
        log.error("T2I_GPU_BATCH=%d needs `-P threads -c %d`; this worker runs one job at a "
                  "time per pool process", runtime.settings().gpu_batch,
                  runtime.settings().gpu_batch)
    elif runtime.settings().gpu_batch > 1 and queues & {FULL, RESUME}:
        try:
            runtime.engine()
        except T2IError:
            log.exception("preloading failed; jobs will report the error")


@signals.worker_ready.connect
def touch_liveness_file(**_: Any) -> None:
    """Liveness without the broker: a thread touches T2I_WORKER_ALIVE_FILE every 10 s, so a
    probe (`find FILE -mmin -1`) sees the worker process run even while Redis is down,
    rather than restarting it (and reloading a GPU model) for another server's outage."""
    path = runtime.settings().worker_alive_file
    if not path:
        return

    def touch_forever() -> None:
        while True:
            Path(path).touch()
            time.sleep(10)

    threading.Thread(target=touch_forever, name="liveness", daemon=True).start()


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def structured_logs(logger: logging.Logger, **_: Any) -> None:
    install_log_format(logger.handlers, runtime.settings().log_format)


_JOB_TASKS = {TRIAGE_TASK, FULL_TASK, RESUME_TASK, REGISTER_TASK,  # first argument: a job id
              WEBHOOK_TASK}
_job_log_tokens: dict[str, contextvars.Token] = {}


@signals.task_prerun.connect
def enter_job_context(task_id: str, task: Task, args: tuple = (), **_: Any) -> None:
    """Every log line of a job task, Celery's own included, names the job (core.logs)."""
    if task.name in _JOB_TASKS and args:
        _job_log_tokens[task_id] = enter_job(str(args[0]), task.name)


@signals.task_postrun.connect
def leave_job_context(task_id: str, **_: Any) -> None:
    token = _job_log_tokens.pop(task_id, None)
    if token is not None:
        leave_job(token)


def _fail(job_id: str, error: str, stage: str) -> dict[str, Any]:
    """Fail the job; a generation that fails also sends the identical jobs that waited for
    it back to triage."""
    record = runtime.job_store().fail(job_id, error, runtime.clock())
    log.error("job %s: failed: %s", job_id, error)
    cache = runtime.cache_config() if stage == "generation" else None
    if cache is not None:
        cache.land(record, succeeded=False)
    return {"job_id": job_id, "state": "failed", "error": error}


def _worker_name(task: Task) -> str:
    """Which worker process holds a job: its node name and pool process id."""
    return f"{task.request.hostname or '?'} pid {os.getpid()}"


def _retried_in_place(task: Task, what: str, work: Callable[[], T]) -> T:
    """Run ``work``, retrying a transient failure here, in the same task, with backoff: up
    to ``max_retries`` times, or for Redis (which holds the job itself) for as long as
    T2I_REDIS_OUTAGE_S; the last failure is raised. Not Celery's ``retry``: that publishes
    a new message, and when the store that failed is Redis the publish fails too and Celery
    drops the message (a lost job, seen in the fault tests)."""
    started, attempt = time.monotonic(), 0
    while True:
        try:
            return work()
        except BrokerUnavailable as exc:
            if time.monotonic() - started > runtime.settings().redis_outage_s:
                raise
            log.warning("%s: %s; retry %d", what, exc, attempt + 1)
        except TransientError as exc:
            if attempt >= task.max_retries:
                raise
            log.warning("%s: %s; retry %d", what, exc, attempt + 1)
        time.sleep(backoff_s(attempt, 1.0, 30.0))
        attempt += 1


def _guarded(task: Task, job_id: str, stage: str,
             work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Shared failure handling of the job tasks: a job is never left stranded mid-stage."""
    try:
        return _retried_in_place(task, f"job {job_id}: {stage}", work)
    except JobNotFound:
        log.warning("job %s: no record (expired or never created); dropped", job_id)
        return {"job_id": job_id, "skipped": "no record"}
    except TransientError as exc:
        return _fail(job_id, f"{stage} gave up after {task.max_retries} retries: {exc}", stage)
    except SoftTimeLimitExceeded:
        return _fail(job_id, f"{stage} time limit exceeded", stage)
    except Exception as exc:  # noqa: BLE001 - any other error fails this job, not the worker
        log.exception("job %s: %s error", job_id, stage)
        return _fail(job_id, f"{stage} error: {type(exc).__name__}: {exc}", stage)


@app.task(name=TRIAGE_TASK, bind=True, max_retries=MAX_RETRIES)
def triage_route(self: Task, job_id: str) -> dict[str, Any]:
    from workers.triage import triage_job

    return _guarded(self, job_id, "triage", lambda: triage_job(
        job_id, runtime.job_store(), RequestLimits.from_settings(runtime.settings()),
        runtime.router(), functools.partial(enqueue, app), runtime.clock,
        runtime.object_store(), runtime.worker_preference()))


@app.task(name=FULL_TASK, bind=True, max_retries=MAX_RETRIES)
def gen_full(self: Task, job_id: str) -> dict[str, Any]:
    from workers.generation import generate_full

    with occupancy.running(self.request.hostname or "?"):
        return _guarded(self, job_id, "generation", lambda: generate_full(
            job_id, runtime.job_store(), runtime.object_store(), runtime.engine(),
            _worker_name(self), runtime.clock, runtime.cache_config(), runtime.reliability()))


@app.task(name=RESUME_TASK, bind=True, max_retries=MAX_RETRIES)
def gen_resume(self: Task, job_id: str) -> dict[str, Any]:
    from workers.generation import generate_resume

    with occupancy.running(self.request.hostname or "?"):
        return _guarded(self, job_id, "generation", lambda: generate_resume(
            job_id, runtime.job_store(), runtime.object_store(), runtime.engine(),
            _worker_name(self), runtime.clock, runtime.cache_config(), runtime.reliability()))


@app.task(name=REGISTER_TASK, bind=True, max_retries=MAX_RETRIES)
def cache_register(self: Task, entry: str, partition: str,
                   sizes: dict[str, int]) -> dict[str, Any]:
    from workers.triage import register_entry

    return _retried_in_place(self, f"entry {entry}: register", lambda: register_entry(
        entry, partition, {int(k): v for k, v in sizes.items()}, runtime.job_store(),
        runtime.embedder(), runtime.vectors(), runtime.catalog(), runtime.clock))


@app.task(name=EVICT_TASK, ignore_result=False)
def cache_evict() -> dict[str, Any]:
    if not runtime.settings().cache_enabled:
        return {"ran": False}
    report = runtime.evictor().run(runtime.clock())
    if report.evicted:
        runtime.metrics().add([sample("t2i_cache_evictions_total", report.evicted),
                               sample("t2i_cache_evicted_bytes_total", report.freed_bytes)])
    return {"ran": report.ran, "locked_out": report.locked_out, "evicted": report.evicted,
            "freed_bytes": report.freed_bytes, "seconds": round(report.seconds, 4)}


@app.task(name=SWEEP_TASK, ignore_result=False)
def cache_sweep() -> dict[str, Any]:
    from dataclasses import asdict

    from cachemgr.evictor import sweep

    if not runtime.settings().cache_enabled:
        return {}
    return asdict(sweep(runtime.catalog(), runtime.object_store(), runtime.vectors(),
                        runtime.clock(), runtime.settings().sweep_grace_s,
                        runtime.embedder().embed))


@app.task(name=TRAIN_PREDICTOR_TASK, ignore_result=False)
def cache_train_predictor() -> dict[str, Any]:
    from cachemgr.predictor_store import train_and_publish

    config = runtime.settings()
    if not (config.cache_enabled and config.predictor_enabled):
        return {"trained": False}
    return train_and_publish(runtime.predictor_store(), str(int(runtime.clock() * 1000)),
                             config.predictor_nu, config.predictor_min_samples)


@app.task(name=RECONCILE_TASK, ignore_result=False)
def jobs_reconcile() -> dict[str, Any]:
    from dataclasses import asdict

    from workers.reconcile import broker_job_ids, reconcile, restore_orphans, sweep_own_queues

    config = runtime.settings()
    if not config.redis_broker:
        return {"ran": False, "why": "the reconciler reads the Redis broker only"}
    broker = runtime.broker_client()
    restored: dict[str, str | None] = {}
    moved: dict[str, str] = {}
    if config.worker_leases:
        a_renewal = functools.partial(time.sleep, config.worker_lease_s / 3 + 1.0)
        with app.connection_for_write() as connection:
            restored = restore_orphans(
                broker, lambda tag: connection.default_channel.qos.restore_by_tag(tag),
                runtime.clock, config.worker_lease_s, second_look=a_renewal)
        moved = sweep_own_queues(broker, lambda task, job_id: enqueue(app, task, job_id),
                                 second_look=a_renewal)
    report = reconcile(runtime.job_store(), lambda: broker_job_ids(broker, JOB_QUEUES),
                       lambda task, job_id: enqueue(app, task, job_id), runtime.clock,
                       config.reconcile_quiet_s, TRIAGE_TASK, config.max_deliveries,
                       second_look=lambda: time.sleep(1.0))
    return {"ran": True, "restored": sorted(filter(None, restored.values())),
            "moved": sorted(moved), **asdict(report)}


@app.task(name=WEBHOOK_TASK)
def webhooks_deliver(delivery: str) -> dict[str, Any]:
    """One attempt of a delivery ("<job id>:<event>"); a failed one that may be retried
    sends itself again later."""
    from workers.webhooks import WebhookOutbox, deliver

    attempt = deliver(delivery, WebhookOutbox(runtime.redis_client()), runtime.job_store(),
                      runtime.webhook_delivery(), runtime.clock)
    if attempt.retry_in_s is not None:
        try:
            enqueue(app, WEBHOOK_TASK, delivery, countdown=attempt.retry_in_s)
        except TransientError as exc:  # the outbox holds it: the sweep re-sends it
            log.warning("webhook %s: retry not scheduled: %s", delivery, exc)
    return {"delivery": delivery, "outcome": attempt.outcome and str(attempt.outcome),
            "retry_in_s": attempt.retry_in_s}


@app.task(name=WEBHOOK_SWEEP_TASK, ignore_result=False)
def webhooks_sweep() -> dict[str, Any]:
    from workers.webhooks import WebhookOutbox, resend_overdue

    interval = runtime.settings().webhook_sweep_interval_s
    resent = resend_overdue(WebhookOutbox(runtime.redis_client()), runtime.clock(),
                            grace_s=interval, resend_after_s=4 * interval,
                            send_message=functools.partial(enqueue, app, WEBHOOK_TASK))
    return {"resent": len(resent)}

"""Generation on GPU workers: run the engine, store the image, finish the job record."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from core.errors import InvalidTransition, JobCancelled
from core.jobs import JobRecord, JobRequest, JobState, image_key
from core.jobstore import JobStore
from core.objectstore import ObjectStore

log = logging.getLogger(__name__)


class GenerationEngine(Protocol):
    label: str

    def generate(self, request: JobRequest, on_step: Callable[[int, int], None]) -> Any: ...


def start_generation(job_id: str, jobs: JobStore, model_label: str, worker: str,
                     now: Callable[[], float]) -> JobRecord | None:
    """Move the job to GENERATING; None when it must not run (finished or cancelled)."""
    record = jobs.get(job_id)
    if record.state.terminal:
        log.info("job %s: generation skipped, job already %s", job_id, record.state)
        return None
    if record.cancel_requested:
        jobs.update(job_id, lambda r: r.transition(JobState.CANCELLED, finished_at=now(),
                                                    error="cancelled by request"))
        return None
    try:
        return jobs.update(job_id, lambda r: r.transition(
            JobState.GENERATING, generation_started_at=now(), step=0,
            total_steps=r.request.steps, deliveries=r.deliveries + 1, worker=worker,
            model=model_label))
    except InvalidTransition:
        return None  # cancelled in between


def step_reporter(job_id: str, jobs: JobStore) -> Callable[[int, int], None]:
    """Per-step progress; raises JobCancelled at the next step after a cancel request."""
    def on_step(step: int, total: int) -> None:
        if jobs.report_progress(job_id, step, total):
            raise JobCancelled(job_id)
    return on_step


def finish_cancelled(job_id: str, jobs: JobStore, now: Callable[[], float]) -> dict[str, Any]:
    jobs.update(job_id, lambda r: r.transition(JobState.CANCELLED, finished_at=now(),
                                                error="cancelled by request"))
    log.info("job %s: cancelled during generation", job_id)
    return {"job_id": job_id, "state": "cancelled"}


def finish_failed(job_id: str, jobs: JobStore, error: str, now: Callable[[], float]) -> dict[str, Any]:
    try:
        jobs.update(job_id, lambda r: r.transition(JobState.FAILED, finished_at=now(), error=error))
    except InvalidTransition:
        pass  # already finished (e.g. cancelled): keep that outcome
    log.error("job %s: failed: %s", job_id, error)
    return {"job_id": job_id, "state": "failed", "error": error}


def store_image(job_id: str, png: bytes, jobs: JobStore, objects: ObjectStore,
                now: Callable[[], float], **fields: Any) -> dict[str, Any]:
    """Write the image under its deterministic key and mark the job succeeded."""
    key = image_key(job_id)
    objects.put(key, png, content_type="image/png")
    finished = now()
    jobs.update(job_id, lambda r: r.transition(
        JobState.SUCCEEDED, image_key=key, generation_finished_at=finished, finished_at=finished,
        step=r.total_steps, extra={**r.extra, **fields}))
    log.info("job %s: succeeded, image %s", job_id, key)
    return {"job_id": job_id, "state": "succeeded", "image_key": key}


def generate_full(job_id: str, jobs: JobStore, objects: ObjectStore, engine: GenerationEngine,
                  worker: str, now: Callable[[], float]) -> dict[str, Any]:
    record = start_generation(job_id, jobs, engine.label, worker, now)
    if record is None:
        return {"job_id": job_id, "skipped": True}
    try:
        result = engine.generate(record.request, step_reporter(job_id, jobs))
    except JobCancelled:
        return finish_cancelled(job_id, jobs, now)
    return store_image(job_id, result.image_png, jobs, objects, now, unet_calls=result.unet_calls)

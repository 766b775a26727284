"""Triage: decide where a job runs and hand it to that GPU queue. Runs on CPU workers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from core.errors import InvalidRequest, InvalidTransition
from core.jobs import JobRecord, JobState, RequestLimits, parse_request
from core.jobstore import JobStore
from workers.app import FULL_TASK

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouteDecision:
    task: str                 # the generation task (and queue) the job goes to
    reason: str               # why, in a word or two: shown to pollers
    details: dict[str, Any] = field(default_factory=dict)  # extra task kwargs / record fields


Decide = Callable[[JobRecord], RouteDecision]


def full_generation_only(record: JobRecord) -> RouteDecision:
    """The route when no cache is consulted."""
    return RouteDecision(FULL_TASK, "cache off")


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
            jobs.update(job_id, lambda r: r.transition(JobState.FAILED, error=f"invalid request: {exc}",
                                                        finished_at=now()))
            log.warning("job %s: refused at triage: %s", job_id, exc)
            return {"job_id": job_id, "failed": str(exc)}
        decision = decide(record)
        jobs.update(job_id, lambda r: r.transition(
            JobState.QUEUED, route=decision.task, route_reason=decision.reason,
            triage_finished_at=now(), extra={**r.extra, **decision.details}))
    except InvalidTransition:
        log.info("job %s: cancelled during triage", job_id)
        return {"job_id": job_id, "skipped": "cancelled"}
    enqueue(decision.task, job_id)
    log.info("job %s: routed to %s (%s)", job_id, decision.task, decision.reason)
    return {"job_id": job_id, "route": decision.task, "reason": decision.reason}

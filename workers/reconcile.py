"""The reconciler: no accepted job is left in a state that nothing will move it out of.

Each unfinished job has a last sign of life (core.jobstore's index: every state change and
every denoising step). A job quiet for longer than ``quiet_s`` whose id no broker message
holds, neither waiting in a queue nor delivered to a worker and unacknowledged, is
stranded: its message was lost (a Redis outage while a worker acknowledged or restored it)
or its worker died where Celery could not hand it back. It is re-sent to the queue of its
stage (core.reconcile), or failed with a reason after ``max_requeues`` tries.

It reads kombu's Redis transport as it stores messages (a list per queue, and the
``unacked`` hash of delivered ones); with another broker it does nothing.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import redis

from core.errors import JobNotFound
from core.jobstore import JobStore, redis_errors
from core.reconcile import GiveUp, Requeue, Wait, stranded_action

log = logging.getLogger(__name__)

UNACKED_KEY = "unacked"          # kombu's Redis transport: delivered, not yet acknowledged
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")  # kombu's priority lists


def _job_id(raw: str) -> str | None:
    """The job id a kombu message carries as its task's first argument."""
    try:
        message = json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]) if args else None
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def broker_job_ids(client: redis.Redis, queues: Iterable[str]) -> set[str]:
    """Ids of the jobs that the Redis broker holds a message for in ``queues``."""
    with redis_errors():
        pipe = client.pipeline(transaction=False)
        for queue in queues:
            for suffix in _PRIORITY_SUFFIXES:
                pipe.lrange(queue + suffix, 0, -1)
        pipe.hvals(UNACKED_KEY)
        *waiting, delivered = pipe.execute()
    raws = [raw for listed in waiting for raw in listed]
    for entry in delivered:
        try:
            raws.append(json.dumps(json.loads(entry)[0]))
        except (ValueError, IndexError, TypeError):
            continue
    return {job_id for raw in raws if (job_id := _job_id(raw))}


def _live(jobs: JobStore, job_id: str) -> bool:
    try:
        return not jobs.get(job_id).state.terminal
    except JobNotFound:
        return False


@dataclass
class ReconcileReport:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def reconcile(jobs: JobStore, held_ids: Callable[[], set[str]],
              send: Callable[[str, str], None], now: Callable[[], float], quiet_s: float,
              triage_task: str, max_requeues: int,
              second_look: Callable[[], None]) -> ReconcileReport:
    """Re-send or fail each stranded job. A job is judged on two looks at the broker,
    ``second_look`` apart, so a message on its way from a queue to a worker's unacked set
    is not taken for a lost one."""
    report = ReconcileReport()
    quiet = jobs.quiet_since(now() - quiet_s)
    if not quiet:
        return report
    held = held_ids()
    suspects = [job_id for job_id, _ in quiet if job_id not in held]
    if not suspects:
        return report
    second_look()
    held = held_ids()
    for job_id in suspects:
        if job_id in held:
            continue
        try:
            record = jobs.get(job_id)
        except JobNotFound:  # expired
            jobs.forget_active(job_id)
            continue
        action = stranded_action(record, triage_task, max_requeues,
                                 lambda leader: _live(jobs, leader))
        if isinstance(action, Wait):
            continue
        if action is None:
            jobs.forget_active(job_id)
        elif isinstance(action, GiveUp):
            jobs.fail(job_id, action.reason, now())
            report.failed.append(job_id)
            log.error("job %s: failed by the reconciler: %s", job_id, action.reason)
        elif isinstance(action, Requeue):
            jobs.update(job_id, lambda r: replace(r, requeues=r.requeues + 1))
            send(action.task, job_id)
            report.requeued.append(job_id)
            log.warning("job %s: no message held it in state %s; re-sent to %s", job_id,
                        record.state, action.task)
    return report

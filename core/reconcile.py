"""What to do with an unfinished job that no queue, no worker and no write has touched for
a while: a message lost to a broker outage, or a worker that died where Celery could not
hand its message back; and which delivered messages no live worker holds. Pure: the
reconciler (workers.reconcile) gathers the facts."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass

from core.jobs import JobRecord, JobState
from core.plan import Reason


@dataclass(frozen=True)
class Requeue:
    """Send ``task`` for the job again: the stage it was in starts over."""

    task: str


@dataclass(frozen=True)
class GiveUp:
    reason: str


@dataclass(frozen=True)
class Wait:
    """Not stranded: it follows an identical job still in flight, whose worker sends it on."""


def stranded_action(record: JobRecord, triage_task: str, max_requeues: int,
                    live: Callable[[str], bool]) -> Requeue | GiveUp | Wait | None:
    """The step that moves a stranded job on: back into the queue of its stage (triage, or
    the generation queue triage chose), or failed with a reason once it has been re-sent
    ``max_requeues`` times (whatever loses it will lose it again). None when it is done.
    A follower of an identical job waits while that job is ``live``; once it ended, the
    follower goes back to triage (its image, or a generation of its own)."""
    if record.state.terminal:
        return None
    plan = record.plan
    if (record.state is JobState.QUEUED and plan is not None and plan.reason is Reason.IN_FLIGHT
            and plan.entry is not None and live(plan.entry)):
        return Wait()
    if record.requeues >= max_requeues:
        return GiveUp(f"its message was lost {record.requeues} times (last in state "
                      f"{record.state}); not re-sent again")
    routed = record.state is JobState.GENERATING or (record.state is JobState.QUEUED and
                                                     record.route)
    return Requeue(record.route if routed else triage_task)


def orphaned(delivered_at: Mapping[str, float], claimed: Set[str], now: float,
             lease_s: float) -> set[str]:
    """Delivery tags whose worker died whole: delivered, unacknowledged, at least ``lease_s``
    ago, and named by no live worker's lease. A live worker renews its lease every third of
    ``lease_s``, so by then it has named every message it received; one that died (SIGKILL,
    a lost machine) leaves no process to hand its messages back, and Redis alone would wait
    the whole visibility timeout. The caller looks twice, a renewal apart, so leases lost
    with Redis itself are renewed before anything is judged on them."""
    return {tag for tag, at in delivered_at.items()
            if now - at >= lease_s and tag not in claimed}

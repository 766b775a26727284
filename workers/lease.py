"""A GPU worker's lease, the Celery side: what the worker holds, renewed in Redis
(workers.reconcile.keep_lease), so that if the worker dies whole the reconciler hands its
messages back within about T2I_WORKER_LEASE_S rather than the visibility timeout. And,
for adapter affinity (core.affinity), what the worker tells triage: the LoRAs it holds and
the jobs it runs; its own queue handed over to the shared ones when it stops.

A message is held from its receipt until its task ends (body done, internal error,
revoked) and while Celery still keeps its request. Celery's ``state.requests`` alone is not
enough: in the fault tests a task whose start failed during a Redis outage (Celery's STARTED
write, "raised outside body") stayed there, so the lease named a message nothing would run;
and the task signals alone are not either: a prefork worker's fire in its pool processes,
while the lease is the parent's.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from celery import bootsteps, signals
from celery.worker import state

from core.errors import T2IError
from workers import runtime
from workers.app import app, enqueue
from workers.queues import GPU_QUEUES

log = logging.getLogger(__name__)


def keeps_lease() -> bool:
    """A GPU worker on a Redis broker keeps a lease unless T2I_WORKER_LEASE_S is 0."""
    config = runtime.settings()
    queues = set(app.amqp.queues.consume_from or ())
    return bool(queues & set(GPU_QUEUES)) and config.worker_leases


class Holdings:
    """The messages this worker holds (by task id) and those not yet acknowledged (by
    delivery tag); thread-safe (consumer, task and lease threads)."""

    def __init__(self, celery_requests: Callable[[], set[str]],
                 now: Callable[[], float] = time.monotonic, settle_s: float = 5.0) -> None:
        self._celery_requests, self._now, self._settle_s = celery_requests, now, settle_s
        self._lock = threading.Lock()
        self._held: dict[str, tuple[Any, float]] = {}
        self._unacknowledged: dict[str, Any] = {}

    def received(self, task_id: str, message: Any) -> None:
        with self._lock:
            self._held[task_id] = (message, self._now())
            for tag in [tag for tag, kept in self._unacknowledged.items() if kept.acknowledged]:
                del self._unacknowledged[tag]
            self._unacknowledged[message.delivery_tag] = message

    def ended(self, task_id: str) -> None:
        with self._lock:
            self._held.pop(task_id, None)

    def tags(self) -> set[str]:
        """Delivery tags held; a message Celery no longer keeps a request for is let go,
        once ``settle_s`` after its receipt (the signal comes before Celery records it)."""
        kept, settled = self._celery_requests(), self._now() - self._settle_s
        with self._lock:
            for task_id in [task_id for task_id, (_, at) in self._held.items()
                            if task_id not in kept and at < settled]:
                del self._held[task_id]
            return {message.delivery_tag for message, _ in self._held.values()}

    def reconnected(self, channel: Any) -> None:
        """After a lost connection, acknowledge through the new ``channel``."""
        with self._lock:
            for message in self._unacknowledged.values():
                if not message.acknowledged and message.channel is not channel:
                    message.channel = channel


holdings = Holdings(lambda: set(state.requests))


@signals.task_received.connect
def hold(request: Any = None, **_: Any) -> None:
    if keeps_lease():
        holdings.received(request.id, request.message)


@signals.task_postrun.connect
@signals.task_internal_error.connect
def release(task_id: str | None = None, **_: Any) -> None:
    if task_id:
        holdings.ended(task_id)


@signals.task_revoked.connect
def release_revoked(request: Any = None, **_: Any) -> None:
    if request is not None:
        holdings.ended(request.id)


@signals.worker_ready.connect
def keep_gpu_worker_lease(sender: Any = None, **_: Any) -> None:
    from workers.reconcile import keep_lease, unsay_worker

    if keeps_lease():
        client = runtime.broker_client()
        try:
            unsay_worker(client, sender.hostname)
        except T2IError as exc:
            log.warning("what an earlier %s held not dropped: %s", sender.hostname, exc)
        threading.Thread(target=keep_lease, name="lease", daemon=True, args=(
            client, sender.hostname, holdings.tags, runtime.settings().worker_lease_s,
            threading.Event())).start()


@signals.worker_shutdown.connect
def hand_over_own_queue(sender: Any = None, **_: Any) -> None:
    """A worker stopping (its consumer already closed) sends the jobs still waiting in its
    own queue to the shared ones, rather than leave them to the reconciler's sweep."""
    from workers.reconcile import take_own_queue

    if not keeps_lease():
        return
    try:
        for task, job_id in take_own_queue(runtime.broker_client(), sender.hostname):
            enqueue(app, task, job_id)
            log.info("job %s: handed over to the shared queue as %s stops", job_id,
                     sender.hostname)
    except T2IError as exc:
        log.warning("own queue not handed over (the reconciler will): %s", exc)


class Occupancy:
    """The generation jobs this process runs; told to triage (workers.reconcile.
    publish_worker) with the LoRAs the engine holds as each starts and ends."""

    def __init__(self) -> None:
        self._lock, self._busy = threading.Lock(), 0

    @contextlib.contextmanager
    def running(self, node: str) -> Iterator[None]:
        self._tell(node, +1)
        try:
            yield
        finally:
            self._tell(node, -1)

    def _tell(self, node: str, change: int) -> None:
        from workers.reconcile import publish_worker

        with self._lock:   # counts are written in the order they change
            self._busy += change
            engine = runtime.loaded_engine()
            if runtime.settings().lora_affinity == "off" or not keeps_lease() or engine is None:
                return
            try:
                publish_worker(runtime.broker_client(), node, engine.resident_adapters(),
                               runtime.settings().gpu_batch, self._busy)
            except T2IError as exc:  # triage then knows less; the job goes on
                log.warning("what this worker holds not published: %s", exc)


occupancy = Occupancy()


class MessagesStayWithTheirJobs(bootsteps.StartStopStep):
    """A GPU worker keeps computing through a broker outage; its jobs' messages must stay
    with them. kombu (5.7) does two things wrong then: closing the lost channel hands the
    unacknowledged messages back while their jobs still run (so they would run twice, when
    Redis answers that close), and a job that ends after the reconnection acknowledges on
    the closed channel, which raises AttributeError and stops the worker (seen with a
    threads pool in the fault tests). So, on each (re)connection of a worker that keeps a
    lease: no hand-back at close (should the worker die, the reconciler hands back what no
    lease names), and the messages still unacknowledged are acknowledged through the new
    channel (an acknowledgement is a delete by delivery tag: any channel does it)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        if not keeps_lease():
            return
        channel = c.task_consumer.channel
        channel.qos.restore_at_shutdown = False
        holdings.reconnected(channel)


app.steps["consumer"].add(MessagesStayWithTheirJobs)

"""The reconciler: no accepted job is left in a state that nothing will move it out of.

Each unfinished job has a last sign of life (core.jobstore's index: every state change and
every denoising step). A job quiet for longer than ``quiet_s`` whose id no broker message
holds, neither waiting in a queue nor delivered to a worker and unacknowledged, is
stranded: its message was lost (a Redis outage while a worker acknowledged or restored it)
or its worker died where Celery could not hand it back. It is re-sent to the queue of its
stage (core.reconcile), or failed with a reason after ``max_requeues`` tries.

A worker that dies whole (SIGKILL of the worker process, a lost machine) leaves no process
to hand its delivered messages back, and Redis alone redelivers them only after the
visibility timeout (hours, so that long queue waits never run twice). So each GPU worker
keeps a lease naming the messages it holds (``keep_lease``), and the reconciler hands back
the GPU messages that no live lease names (``restore_orphans``, rule in core.reconcile).
That is how a batching worker (one process, many jobs) gets its jobs back in about
T2I_WORKER_LEASE_S, where a prefork worker's dead pool process gets Celery's at once.

A GPU worker also has a queue of its own (workers.queues.affinity_queue: LoRA jobs triage
sent to it, core.affinity). Its messages count as held; once the worker's lease has lapsed
on two looks a renewal apart, the reconciler takes that queue whole and re-sends its jobs
to the shared queues (``sweep_own_queues``); a worker that stops gracefully hands its own
queue over itself (``take_own_queue``).

It reads kombu's Redis transport as it stores messages (a list per queue, the ``unacked``
hash of delivered ones and their ``unacked_index`` of delivery times); with another broker
it does nothing.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import redis

from core.affinity import WorkerView
from core.errors import BrokerUnavailable, JobNotFound
from core.jobstore import JobStore, redis_errors
from core.reconcile import GiveUp, Requeue, Wait, orphaned, stranded_action
from workers.queues import AFFINITY_PREFIX, affinity_queue, is_gpu_queue

log = logging.getLogger(__name__)

UNACKED_KEY = "unacked"          # kombu's Redis transport: delivered, not yet acknowledged
UNACKED_INDEX_KEY = "unacked_index"  # kombu's: delivery tag -> when it was delivered
LEASES_KEY = "t2i:worker-leases"     # the nodes that keep a lease
WORKER_KEY_PREFIX = "t2i:worker-adapters:"  # + node: what a GPU worker holds, for triage
WORKER_KEY_TTL_S = 24 * 3600         # only a live lease makes it count; this bounds a leak
OWN_QUEUES_KEY = "t2i:own-queues"    # nodes whose own queue may hold messages
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")  # kombu's priority lists


def _task(raw: str) -> tuple[str, str] | None:
    """The task name and job id a kombu message carries."""
    try:
        task = str(json.loads(raw)["headers"]["task"])
    except (ValueError, KeyError, TypeError):
        return None
    job_id = _job_id(raw)
    return (task, job_id) if job_id else None


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
    """Ids of the jobs that the Redis broker holds a message for in ``queues`` or in a GPU
    worker's own queue (until ``sweep_own_queues`` moves them)."""
    with redis_errors():
        queues = [*queues, *(affinity_queue(node) for node in client.smembers(OWN_QUEUES_KEY))]
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


def _lease_key(node: str) -> str:
    return f"t2i:worker-lease:{node}"


def renew_lease(client: redis.Redis, node: str, held: Iterable[str], lease_s: float) -> None:
    """Say that ``node`` lives and holds the messages ``held`` (delivery tags), for
    ``lease_s``."""
    with redis_errors():
        pipe = client.pipeline(transaction=False)
        pipe.sadd(LEASES_KEY, node)
        pipe.set(_lease_key(node), json.dumps(sorted(held)), px=max(1, int(lease_s * 1000)))
        pipe.execute()


def keep_lease(client: redis.Redis, node: str, held: Callable[[], Iterable[str]],
               lease_s: float, stop: threading.Event) -> None:
    """Renew the lease every third of ``lease_s`` until ``stop``; a Redis outage is logged
    and waited out (the reconciler's second look gives a renewal's time after it)."""
    failing = False
    while not stop.is_set():
        try:
            renew_lease(client, node, held(), lease_s)
            if failing:
                log.info("worker lease of %s renewed again", node)
            failing = False
        except BrokerUnavailable as exc:
            if not failing:
                log.warning("worker lease of %s not renewed: %s", node, exc)
            failing = True
        stop.wait(lease_s / 3)


def _leases(client: redis.Redis) -> dict[str, str | None]:
    """Each node that kept a lease -> its lease (None once it lapsed)."""
    with redis_errors():
        nodes = sorted(client.smembers(LEASES_KEY))
        return dict(zip(nodes, client.mget([_lease_key(node) for node in nodes]), strict=True)
                    ) if nodes else {}


def live_nodes(client: redis.Redis) -> list[str]:
    return [node for node, lease in _leases(client).items() if lease is not None]


def claimed_tags(client: redis.Redis) -> set[str]:
    """The delivery tags that live leases name; nodes whose lease lapsed are forgotten."""
    leases = _leases(client)
    lapsed = [node for node, lease in leases.items() if lease is None]
    if lapsed:
        with redis_errors():
            client.srem(LEASES_KEY, *lapsed)
    return {tag for lease in leases.values() if lease for tag in json.loads(lease)}


def using_own_queue(client: redis.Redis, node: str) -> None:
    """Note, before sending it a message, that ``node``'s own queue is in use."""
    with redis_errors():
        client.sadd(OWN_QUEUES_KEY, node)


def take_own_queue(client: redis.Redis, node: str) -> list[tuple[str, str]]:
    """Empty ``node``'s own queue at once (a message is taken either by its worker or here,
    never both): the (task, job id) of each message in it."""
    keys = [affinity_queue(node) + suffix for suffix in _PRIORITY_SUFFIXES]
    with redis_errors():
        pipe = client.pipeline(transaction=True)
        for key in keys:
            pipe.lrange(key, 0, -1)
        pipe.delete(*keys)
        pipe.srem(OWN_QUEUES_KEY, node)
        *listed, _, _ = pipe.execute()
    return [sent for raws in listed for raw in reversed(raws) if (sent := _task(raw))]


def sweep_own_queues(client: redis.Redis, send: Callable[[str, str], None],
                     second_look: Callable[[], None]) -> dict[str, str]:
    """Re-send (``send(task, job id)``, to the shared queues) the jobs waiting in the own
    queue of each worker whose lease lapsed on two looks ``second_look`` apart (a renewal,
    so a worker that only lost its lease with Redis keeps its queue). Returns job -> node."""
    def lapsed() -> set[str]:
        with redis_errors():
            nodes = sorted(client.smembers(OWN_QUEUES_KEY))
            leases = client.mget([_lease_key(node) for node in nodes]) if nodes else []
        return {node for node, lease in zip(nodes, leases, strict=True) if lease is None}

    suspects = lapsed()
    if not suspects:
        return {}
    second_look()
    moved: dict[str, str] = {}
    for node in sorted(suspects & lapsed()):
        for task, job_id in take_own_queue(client, node):
            send(task, job_id)
            moved[job_id] = node
            log.warning("job %s: waited in the own queue of %s, whose lease lapsed; re-sent "
                        "to the shared queue", job_id, node)
    return moved


def unsay_worker(client: redis.Redis, node: str) -> None:
    """Drop what an earlier process of ``node`` said it held (a restart under one name)."""
    with redis_errors():
        client.delete(WORKER_KEY_PREFIX + node)


def publish_worker(client: redis.Redis, node: str, resident: Iterable[str], capacity: int,
                   busy: int) -> None:
    """Say which LoRAs (content digests) GPU worker ``node`` holds, how many jobs it runs
    at once and how many it runs now (core.affinity)."""
    with redis_errors():
        client.set(WORKER_KEY_PREFIX + node, json.dumps(
            {"resident": sorted(resident), "capacity": capacity, "busy": busy}),
            ex=WORKER_KEY_TTL_S)


def worker_views(client: redis.Redis) -> list[WorkerView]:
    """The GPU workers with a live lease, what each said it holds; a worker's load is the
    jobs it runs plus those waiting in its own queue. One that said nothing yet (just
    started) holds nothing and counts as free."""
    nodes = live_nodes(client)
    if not nodes:
        return []
    with redis_errors():
        pipe = client.pipeline(transaction=False)
        pipe.mget([WORKER_KEY_PREFIX + node for node in nodes])
        for node in nodes:
            pipe.llen(affinity_queue(node))
        published, *waiting = pipe.execute()
    views = []
    for node, said, queued in zip(nodes, published, waiting, strict=True):
        view: dict[str, Any] = json.loads(said) if said else {"resident": [], "capacity": 1,
                                                               "busy": 0}
        views.append(WorkerView(node, frozenset(view["resident"]), int(view["capacity"]),
                                int(view["busy"]) + int(queued)))
    return views


def gpu_deliveries(client: redis.Redis) -> dict[str, tuple[float, str | None, str]]:
    """The GPU queues' (shared and workers' own) delivered, unacknowledged messages:
    delivery tag -> (when delivered, job id, queue)."""
    with redis_errors():
        pipe = client.pipeline(transaction=False)
        pipe.hgetall(UNACKED_KEY)
        pipe.zrange(UNACKED_INDEX_KEY, 0, -1, withscores=True)
        entries, index = pipe.execute()
    delivered_at = dict(index)
    found: dict[str, tuple[float, str | None, str]] = {}
    for tag, entry in entries.items():
        try:
            payload, _exchange, routing_key = json.loads(entry)
        except (ValueError, TypeError):
            continue
        if is_gpu_queue(routing_key) and tag in delivered_at:
            found[tag] = (float(delivered_at[tag]), _job_id(json.dumps(payload)), routing_key)
    return found


def restore_orphans(client: redis.Redis, restore: Callable[[str], None],
                    now: Callable[[], float], lease_s: float,
                    second_look: Callable[[], None]) -> dict[str, str | None]:
    """Hand back (``restore``, by delivery tag) the GPU messages whose worker died whole
    (core.reconcile.orphaned), judged on two looks ``second_look`` apart (at least one lease
    renewal, so leases lost with Redis are renewed first). Returns tag -> job id."""
    def look() -> tuple[set[str], dict[str, tuple[float, str | None, str]]]:
        deliveries = gpu_deliveries(client)
        when = {tag: at for tag, (at, _, _) in deliveries.items()}
        return orphaned(when, claimed_tags(client), now(), lease_s), deliveries

    suspects, _ = look()
    if not suspects:
        return {}
    second_look()
    still, deliveries = look()
    restored: dict[str, str | None] = {}
    for tag in sorted(suspects & still):
        restore(tag)
        restored[tag] = job_id = deliveries[tag][1]
        log.warning("job %s: no live worker holds its message %s (its worker died whole); "
                    "handed back to its queue", job_id, tag)
    # one handed back to a dead worker's own queue waits there for sweep_own_queues
    for node in {queue.removeprefix(AFFINITY_PREFIX) for tag in restored
                 if (queue := deliveries[tag][2]).startswith(AFFINITY_PREFIX)}:
        using_own_queue(client, node)
    return restored


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

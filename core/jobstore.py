"""Job records in Redis, one hash per job (polling reads only these), and the service's
counters in one more hash, moved in the same transactions (see core.metrics)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar, cast

import redis

from core.backoff import backoff_s
from core.errors import BrokerUnavailable, IdempotencyConflict, JobNotFound, T2IError
from core.jobs import JobRecord, JobState
from core.metrics import Sample, merged, sample, transition_samples
from core.webhooks import Event, delivery_key

if TYPE_CHECKING:
    from core.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

KEY_PREFIX = "t2i:job:"
METRICS_KEY = "t2i:metrics"
IDEMPOTENCY_PREFIX = "t2i:idem:"          # + tenant:key -> "<job id> <request fingerprint>"
# Webhook deliveries, each "<job id>:<event>" (core.webhooks.delivery_key):
WEBHOOK_OUTBOX = "t2i:webhooks"          # sorted set: delivery -> when its POST is due
WEBHOOK_ATTEMPTS = "t2i:webhook-attempts"  # hash: delivery -> failed POSTs so far
WEBHOOK_RESENT = "t2i:webhook-resent"    # hash: delivery -> when the sweep last re-sent it
ACTIVE_JOBS = "t2i:active"               # sorted set: unfinished job id -> last sign of life
EVENTS_PREFIX = "t2i:events:"            # stream per job: each state change and step, in order
TENANT_JOBS_PREFIX = "t2i:tenant-jobs:"  # sorted set per tenant: job id -> when submitted
EVENTS_MAXLEN = 2000                     # entries kept per job (above the most steps a job has)

WebhookDue = Callable[[str], None]
"""Called with a delivery key once a transaction put that webhook delivery in the outbox."""


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Turn redis-py's connection failures into the project's BrokerUnavailable."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise BrokerUnavailable(f"Redis unreachable: {exc}") from exc


def transaction(client: redis.Redis, apply: Callable[[redis.client.Pipeline], T],
                *watched: str) -> T:
    """redis-py's optimistic transaction (WATCH, then ``apply``'s MULTI/EXEC, retried on a
    concurrent write), returning what ``apply`` returns."""
    return cast(T, client.transaction(cast(Any, apply), *watched, value_from_callable=True))


def connect(url: str, timeout_s: float = 10.0) -> redis.Redis:
    """A Redis client that fails fast (seconds, not minutes) when the server is down."""
    return redis.Redis.from_url(url, decode_responses=True,
                                socket_connect_timeout=min(3.0, timeout_s),
                                socket_timeout=timeout_s, health_check_interval=30)


def add_to(pipe: redis.client.Pipeline, samples: Iterable[Sample]) -> None:
    """Queue counter additions on ``pipe``, inside the caller's transaction."""
    for field, amount in merged(samples).items():
        pipe.hincrbyfloat(METRICS_KEY, field, amount)


class MetricsStore:
    """The counters as one hash: workers add, the API's /metrics reads."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def add(self, samples: Iterable[Sample]) -> None:
        with redis_errors():
            pipe = self._redis.pipeline(transaction=True)
            add_to(pipe, samples)
            pipe.execute()

    def read(self) -> dict[str, float]:
        with redis_errors():
            return {k: float(v) for k, v in self._redis.hgetall(METRICS_KEY).items()}


class JobRules:
    """The job-store operations made of ``update``: one copy for Redis and the in-memory
    twin."""

    def update(self, job_id: str, change: Callable[[JobRecord], JobRecord]) -> JobRecord:
        raise NotImplementedError

    def request_cancel(self, job_id: str, now: float) -> JobRecord:
        """Mark a job cancelled at once if no worker holds it, else ask its worker to stop.

        Cancelling a finished job changes nothing and returns it as it is.
        """
        def change(record: JobRecord) -> JobRecord:
            if record.state.terminal:
                return record
            if record.state in (JobState.QUEUED, JobState.TRIAGE):
                return record.transition(JobState.CANCELLED, cancel_requested=True,
                                         finished_at=now, error="cancelled by request")
            return record.transition(record.state, cancel_requested=True)

        return self.update(job_id, change)

    def fail(self, job_id: str, error: str, now: float) -> JobRecord:
        """Mark a job failed with ``error``; a job already finished keeps its outcome."""
        def change(record: JobRecord) -> JobRecord:
            if record.state.terminal:
                return record
            return record.transition(JobState.FAILED, finished_at=now, error=error)

        return self.update(job_id, change)


class JobStore(JobRules):
    """Job records, and the index of unfinished jobs with their last sign of life (which
    the reconciler reads to find jobs that nothing will move on).

    ``outage_s``: how long reads and state changes wait for Redis to come back before they
    raise BrokerUnavailable. Workers holding a job wait (a finished image is not thrown away
    for a Redis restart); the API passes 0 and answers 503 at once.
    """

    def __init__(self, client: redis.Redis, ttl_s: int, webhook_due: WebhookDue | None = None,
                 outage_s: float = 0.0, now: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._redis = client
        self._ttl_s = ttl_s
        self._webhook_due = webhook_due
        self._outage_s = outage_s
        self._now = now
        self._sleep = sleep

    @classmethod
    def from_settings(cls, config: Settings, webhook_due: WebhookDue | None = None,
                      outage_s: float = 0.0) -> JobStore:
        return cls(connect(config.redis_url), config.job_ttl_s, webhook_due, outage_s)

    def _outlasting(self, what: str, operation: Callable[[], T]) -> T:
        """Run ``operation``, retrying while Redis is unreachable, for up to ``outage_s``."""
        started, attempt = self._now(), 0
        while True:
            try:
                return operation()
            except BrokerUnavailable as exc:
                delay = backoff_s(attempt, 0.5, 5.0)
                if self._now() - started + delay > self._outage_s:
                    raise
                log.warning("%s: %s; waiting %.1f s for Redis", what, exc, delay)
                self._sleep(delay)
                attempt += 1

    @staticmethod
    def key(job_id: str) -> str:
        return KEY_PREFIX + job_id

    def ping(self) -> None:
        with redis_errors():
            self._redis.ping()

    @staticmethod
    def events_key(job_id: str) -> str:
        return EVENTS_PREFIX + job_id

    def _queue_event(self, pipe: redis.client.Pipeline, job_id: str, state: JobState, step: int,
                     total: int) -> None:
        """Append the job's state and step to its event stream (server-sent events read it,
        from the start or from the last id a client saw), kept as long as the record."""
        key = self.events_key(job_id)
        pipe.xadd(key, {"state": str(state), "step": step, "total": total},
                  maxlen=EVENTS_MAXLEN, approximate=True)
        pipe.expire(key, self._ttl_s)

    def _queue_create(self, pipe: redis.client.Pipeline, record: JobRecord) -> None:
        pipe.hset(self.key(record.id), mapping=record.to_fields())
        pipe.expire(self.key(record.id), self._ttl_s)
        self._queue_event(pipe, record.id, record.state, record.step, record.total_steps)
        pipe.zadd(TENANT_JOBS_PREFIX + record.tenant, {record.id: record.submitted_at})
        if not record.state.terminal:
            pipe.zadd(ACTIVE_JOBS, {record.id: self._now()})
        add_to(pipe, [sample("t2i_jobs_submitted_total")])

    def create(self, record: JobRecord, idempotency: tuple[str, str] | None = None) -> str:
        """Store a new job; returns its id. With ``idempotency`` = (slot, request fingerprint)
        and the slot already taken by the same request, nothing is stored and the earlier
        job's id is returned; taken by another request, IdempotencyConflict."""
        with redis_errors():
            if idempotency is None:
                pipe = self._redis.pipeline()
                self._queue_create(pipe, record)
                pipe.execute()
                return record.id
            slot, fingerprint = idempotency
            key = IDEMPOTENCY_PREFIX + slot

            def claim_slot(pipe: redis.client.Pipeline) -> str:
                held = pipe.get(key)
                if held:
                    earlier_id, _, earlier = held.partition(" ")
                    if earlier != fingerprint:
                        raise IdempotencyConflict(
                            f"idempotency key {slot.partition(':')[2]!r} was used for "
                            f"job {earlier_id} with a different request")
                    return earlier_id
                pipe.multi()
                pipe.set(key, f"{record.id} {fingerprint}", ex=self._ttl_s)
                self._queue_create(pipe, record)
                return record.id

            return transaction(self._redis, claim_slot, key)

    def release_idempotency(self, slot: str) -> None:
        """Free a key whose job never got enqueued, so the client's retry makes a new one."""
        with redis_errors():
            self._redis.delete(IDEMPOTENCY_PREFIX + slot)

    def get(self, job_id: str) -> JobRecord:
        def read() -> dict[str, str]:
            with redis_errors():
                return self._redis.hgetall(self.key(job_id))

        raw = self._outlasting(f"job {job_id}: read", read)
        if not raw:
            raise JobNotFound(job_id)
        return JobRecord.from_fields(raw)

    def update(self, job_id: str, change: Callable[[JobRecord], JobRecord]) -> JobRecord:
        """Apply ``change`` atomically (optimistic WATCH/MULTI, retried on a concurrent write).
        In the same transaction: the metrics it moves (so a retry never counts twice) and the
        webhook deliveries of the events it makes happen (started, completed, as the job
        wants: an outbox, so none can be lost), after which ``webhook_due`` is told each, so
        a delivery need not wait for a sweep.

        ``change`` may raise (e.g. InvalidTransition); then nothing is written.
        """
        key = self.key(job_id)
        outboxed: list[str] = []

        def apply(pipe: redis.client.Pipeline) -> JobRecord:
            raw = pipe.hgetall(key)
            if not raw:
                raise JobNotFound(job_id)
            old = JobRecord.from_fields(raw)
            new = change(old)
            pipe.multi()
            pipe.hset(key, mapping=new.to_fields())
            if (new.state, new.step, new.total_steps) != (old.state, old.step, old.total_steps):
                self._queue_event(pipe, job_id, new.state, new.step, new.total_steps)
            add_to(pipe, transition_samples(old, new))
            outboxed[:] = [delivery_key(job_id, event) for event in new.events_due(old)]
            if outboxed:
                pipe.zadd(WEBHOOK_OUTBOX, dict.fromkeys(outboxed, 0))  # due at once
            if new.state.terminal:
                pipe.zrem(ACTIVE_JOBS, job_id)
            else:
                pipe.zadd(ACTIVE_JOBS, {job_id: self._now()})
            return new

        def transact() -> JobRecord:
            with redis_errors():
                return transaction(self._redis, apply, key)

        new = self._outlasting(f"job {job_id}: update", transact)
        for delivery in outboxed:
            self._tell_webhook_due(delivery)
        return new

    def _tell_webhook_due(self, delivery: str) -> None:
        if self._webhook_due is None:
            return
        try:
            self._webhook_due(delivery)
        except T2IError as exc:  # the outbox holds it: the sweep sends it later
            log.warning("webhook %s: message not sent yet: %s", delivery, exc)

    def report_progress(self, job_id: str, step: int, total: int,
                        progress_webhook: bool = False) -> bool:
        """Cheap per-step write (outside the state machine), which is also the job's sign of
        life; returns whether a cancel was asked. Never waits for Redis. With
        ``progress_webhook`` (the job wants progress events) it also puts a progress delivery
        in the outbox unless one is pending: the delivery sends the job as it is then, so a
        slow receiver gets fewer, later steps rather than a backlog."""
        delivery = delivery_key(job_id, Event.PROGRESS)
        with redis_errors():
            pipe = self._redis.pipeline(transaction=False)
            pipe.hset(self.key(job_id), mapping={"step": step, "total_steps": total})
            pipe.zadd(ACTIVE_JOBS, {job_id: self._now()}, xx=True)
            pipe.hget(self.key(job_id), "cancel_requested")
            self._queue_event(pipe, job_id, JobState.GENERATING, step, total)
            if progress_webhook:
                pipe.zadd(WEBHOOK_OUTBOX, {delivery: 0}, nx=True)
            answers = pipe.execute()
        if progress_webhook and answers[-1]:
            self._tell_webhook_due(delivery)
        return answers[2] == "1"

    def tenant_jobs(self, tenant: str, limit: int, before: float | None) -> list[JobRecord]:
        """The tenant's jobs, newest first, submitted before ``before`` (None: any time);
        ids whose record expired are dropped from the index as they are met."""
        key = TENANT_JOBS_PREFIX + tenant
        with redis_errors():
            self._redis.zremrangebyscore(key, "-inf", f"({self._now() - self._ttl_s}")
            ids = self._redis.zrevrangebyscore(
                key, f"({before}" if before is not None else "+inf", "-inf", 0, limit)
            pipe = self._redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(self.key(job_id))
            found = pipe.execute()
            gone = [job_id for job_id, raw in zip(ids, found, strict=True) if not raw]
            if gone:
                self._redis.zrem(key, *gone)
        return [JobRecord.from_fields(raw) for raw in found if raw]

    def quiet_since(self, before: float, limit: int = 1000) -> list[tuple[str, float]]:
        """Unfinished jobs with no sign of life since ``before``: (job id, last sign)."""
        with redis_errors():
            return [(job_id, float(score)) for job_id, score in self._redis.zrangebyscore(
                ACTIVE_JOBS, "-inf", before, 0, limit, withscores=True)]

    def forget_active(self, job_id: str) -> None:
        """Drop a job from the unfinished index (its record expired or it finished)."""
        with redis_errors():
            self._redis.zrem(ACTIVE_JOBS, job_id)


class InMemoryJobStore(JobRules):
    """The job store's in-memory twin, for worker logic tested without Redis: the same
    state machine (JobRecord.transition) and the same rules (JobRules)."""

    def __init__(self) -> None:
        self.records: dict[str, JobRecord] = {}

    def create(self, record: JobRecord) -> str:
        self.records[record.id] = record
        return record.id

    def get(self, job_id: str) -> JobRecord:
        if job_id not in self.records:
            raise JobNotFound(job_id)
        return self.records[job_id]

    def update(self, job_id: str, change: Callable[[JobRecord], JobRecord]) -> JobRecord:
        self.records[job_id] = change(self.get(job_id))
        return self.records[job_id]

    def report_progress(self, job_id: str, step: int, total: int,
                        progress_webhook: bool = False) -> bool:
        self.records[job_id] = replace(self.get(job_id), step=step, total_steps=total)
        return self.records[job_id].cancel_requested

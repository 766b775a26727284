"""Job records in Redis, one hash per job. Polling reads only these."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import redis

from core.errors import BrokerUnavailable, JobNotFound
from core.jobs import JobRecord, JobState

if TYPE_CHECKING:
    from celeryconfig import Settings

KEY_PREFIX = "t2i:job:"


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Turn redis-py's connection failures into the project's BrokerUnavailable."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise BrokerUnavailable(f"Redis unreachable: {exc}") from exc


def connect(url: str) -> redis.Redis:
    """A Redis client that fails fast (seconds, not minutes) when the server is down."""
    return redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=3,
                                socket_timeout=10, health_check_interval=30)


class JobStore:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self._redis = client
        self._ttl_s = ttl_s

    @classmethod
    def from_settings(cls, config: Settings) -> JobStore:
        return cls(connect(config.redis_url), config.job_ttl_s)

    @staticmethod
    def key(job_id: str) -> str:
        return KEY_PREFIX + job_id

    def ping(self) -> None:
        with redis_errors():
            self._redis.ping()

    def create(self, record: JobRecord) -> None:
        with redis_errors():
            pipe = self._redis.pipeline()
            pipe.hset(self.key(record.id), mapping=record.to_fields())
            pipe.expire(self.key(record.id), self._ttl_s)
            pipe.execute()

    def get(self, job_id: str) -> JobRecord:
        with redis_errors():
            raw = self._redis.hgetall(self.key(job_id))
        if not raw:
            raise JobNotFound(job_id)
        return JobRecord.from_fields(raw)

    def update(self, job_id: str, change: Callable[[JobRecord], JobRecord]) -> JobRecord:
        """Apply ``change`` atomically (optimistic WATCH/MULTI, retried on a concurrent write).

        ``change`` may raise (e.g. InvalidTransition); then nothing is written.
        """
        key = self.key(job_id)
        with redis_errors():
            while True:
                with self._redis.pipeline() as pipe:
                    try:
                        pipe.watch(key)
                        raw = pipe.hgetall(key)
                        if not raw:
                            raise JobNotFound(job_id)
                        new = change(JobRecord.from_fields(raw))
                        pipe.multi()
                        pipe.hset(key, mapping=new.to_fields())
                        pipe.execute()
                        return new
                    except redis.WatchError:
                        continue

    def report_progress(self, job_id: str, step: int, total: int) -> bool:
        """Cheap per-step write (outside the state machine); returns whether a cancel was asked."""
        with redis_errors():
            pipe = self._redis.pipeline(transaction=False)
            pipe.hset(self.key(job_id), mapping={"step": step, "total_steps": total})
            pipe.hget(self.key(job_id), "cancel_requested")
            return pipe.execute()[1] == "1"

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

"""Webhook delivery, run by a periodic task on the CPU (cache) worker, never a GPU worker.

A finished job with a webhook is put in a Redis outbox in the same transaction as its
final state (core.jobstore). Each run POSTs the due ones; a failure is retried later with
backoff, up to ``max_attempts``; the outcome is written on the job record (``webhook``).
At least once: a worker that dies after a POST but before recording it sends it again, so
receivers dedupe on the ``X-T2I-Delivery`` header (the job id).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import httpx
import redis

from core.errors import DeliveryFailed, JobNotFound
from core.jobstore import WEBHOOK_ATTEMPTS, WEBHOOK_OUTBOX, JobStore, redis_errors
from core.webhooks import SIGNATURE_HEADER, retry_delay_s, sign, tenant_secret

log = logging.getLogger(__name__)

Post = Callable[[str, bytes, dict[str, str]], int]
"""(url, body, headers) -> HTTP status; raises DeliveryFailed when there is no answer."""


def http_post(timeout_s: float) -> Post:
    def post(url: str, body: bytes, headers: dict[str, str]) -> int:
        try:
            return httpx.post(url, content=body, headers=headers, timeout=timeout_s).status_code
        except httpx.HTTPError as exc:
            raise DeliveryFailed(f"{type(exc).__name__}: {exc}") from exc
    return post


class WebhookOutbox:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def claim_due(self, now: float, lease_s: float, limit: int = 50) -> list[str]:
        """Take up to ``limit`` due deliveries, moving each one's due time ``lease_s`` ahead
        so concurrent runs do not send it twice (and a crashed run's are retried)."""
        def claim(job_id: str, pipe: redis.client.Pipeline) -> bool:
            score = pipe.zscore(WEBHOOK_OUTBOX, job_id)
            if score is None or score > now:
                return False  # delivered, or claimed by a concurrent run
            pipe.multi()
            pipe.zadd(WEBHOOK_OUTBOX, {job_id: now + lease_s})
            return True

        with redis_errors():
            due = self._redis.zrangebyscore(WEBHOOK_OUTBOX, "-inf", now, 0, limit)
            return [job_id for job_id in due if self._redis.transaction(
                functools.partial(claim, job_id), WEBHOOK_OUTBOX, value_from_callable=True)]

    def done(self, job_id: str) -> None:
        with redis_errors():
            self._redis.pipeline().zrem(WEBHOOK_OUTBOX, job_id).hdel(
                WEBHOOK_ATTEMPTS, job_id).execute()

    def failed(self, job_id: str) -> int:
        """Count one more failed POST; returns the count."""
        with redis_errors():
            return int(self._redis.hincrby(WEBHOOK_ATTEMPTS, job_id, 1))

    def retry_at(self, job_id: str, when: float) -> None:
        with redis_errors():
            self._redis.zadd(WEBHOOK_OUTBOX, {job_id: when})


@dataclass
class DeliveryReport:
    delivered: list[str] = field(default_factory=list)
    retrying: list[str] = field(default_factory=list)
    given_up: list[str] = field(default_factory=list)


def deliver_due(outbox: WebhookOutbox, jobs: JobStore, post: Post, master_secret: str,
                now: Callable[[], float], max_attempts: int, timeout_s: float,
                batch: int = 10) -> DeliveryReport:
    """POST up to ``batch`` due deliveries, one try each. They are claimed for longer than
    the run can take, so an overlapping run leaves them alone."""
    report = DeliveryReport()
    for job_id in outbox.claim_due(now(), lease_s=(batch + 1) * timeout_s, limit=batch):
        try:
            record = jobs.get(job_id)
        except JobNotFound:  # expired: nothing left to tell
            outbox.done(job_id)
            continue
        body = json.dumps({"event": "job.finished", "job": record.public()},
                          sort_keys=True).encode()
        headers = {"Content-Type": "application/json", "X-T2I-Delivery": job_id,
                   SIGNATURE_HEADER: sign(tenant_secret(master_secret, record.tenant),
                                          int(now()), body)}
        try:
            status = post(record.webhook_url, body, headers)
            problem = "" if 200 <= status < 300 else f"HTTP {status}"
        except DeliveryFailed as exc:
            problem = str(exc)
        if not problem:
            outbox.done(job_id)
            note = f"delivered (HTTP {status})"
            report.delivered.append(job_id)
        else:
            attempts = outbox.failed(job_id)
            if attempts >= max_attempts:
                outbox.done(job_id)
                note = f"gave up after {attempts} attempts: {problem}"
                report.given_up.append(job_id)
            else:
                outbox.retry_at(job_id, now() + retry_delay_s(attempts))
                note = f"attempt {attempts} failed: {problem}; retrying"
                report.retrying.append(job_id)
        jobs.update(job_id, lambda r, n=note: replace(r, extra={**r.extra, "webhook": n}))
        log.info("job %s: webhook %s", job_id, note)
    return report

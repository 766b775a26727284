"""Webhook delivery, on its own queue and worker (``webhooks``): a slow receiver never
holds up triage, the cache or a GPU.

Each event a job's webhook wants (started, progress, completed: core.webhooks.Event)
enters a Redis outbox as ``<job id>:<event>`` in the same write that makes it happen
(core.jobstore), and a ``webhooks.deliver`` message for it is sent right after. Each
message makes one attempt: claim the outbox entry, read the job as it is now, resolve its
host, check every address (core.webhooks.AddressPolicy), POST to a checked address, never a
re-resolved one, within a total deadline, and record a coarse outcome (the completion's on
the job). A failed start or completion is retried by a delayed message, backing off; a
failed progress POST is not (the next step sends a newer one), and progress after the job
finished is dropped. The beat task ``webhooks.sweep`` re-sends a message for any entry
whose message was lost. At least once: receivers dedupe on ``webhook-id`` (Standard
Webhooks, core.webhooks).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace

import httpx
import redis

from core.backoff import backoff_s
from core.errors import DeliveryFailed, InvalidRequest, JobNotFound, T2IError, WebhookRefused
from core.jobs import JobRecord
from core.jobstore import (
    WEBHOOK_ATTEMPTS,
    WEBHOOK_OUTBOX,
    WEBHOOK_RESENT,
    JobStore,
    redis_errors,
    transaction,
)
from core.webhooks import (
    RETRY_CAP_S,
    RETRY_FIRST_S,
    AddressPolicy,
    Event,
    Outcome,
    Resolve,
    WebhookTarget,
    message_id,
    parse_delivery_key,
    parse_target,
    signed_headers,
    tenant_secret,
)

log = logging.getLogger(__name__)

Send = Callable[[str, WebhookTarget, bytes, dict[str, str]], int]
"""(address, target, body, headers) -> HTTP status; raises DeliveryFailed without one."""


def resolve_host(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (IP literals in any spelling included)."""
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


async def _post(address: str, target: WebhookTarget, body: bytes, headers: dict[str, str],
                deadline_s: float) -> int:
    url = httpx.URL(scheme=target.scheme, host=address, port=target.port,
                    raw_path=target.target.encode("ascii"))
    # TLS checks the certificate against the name, while the socket goes to the address
    # that was checked: a second lookup (DNS rebinding) can never change where it goes.
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    async with httpx.AsyncClient(trust_env=False, follow_redirects=False,
                                 timeout=deadline_s) as client:
        async with client.stream("POST", url, content=body, extensions=extensions,
                                 headers={**headers, "Host": target.host_header}) as response:
            return response.status_code  # the body is never read: it could be endless


def http_send(deadline_s: float) -> Send:
    """POST with a total deadline (connect, send and the answer's head together): a
    receiver that trickles bytes cannot hold a delivery slot longer than that."""
    def send(address: str, target: WebhookTarget, body: bytes, headers: dict[str, str]) -> int:
        try:
            return asyncio.run(asyncio.wait_for(_post(address, target, body, headers,
                                                      deadline_s), deadline_s))
        except (httpx.HTTPError, OSError, TimeoutError, ValueError) as exc:
            raise DeliveryFailed(f"{type(exc).__name__}: {exc}") from exc
    return send


class WebhookOutbox:
    """Due deliveries: a sorted set of delivery (core.webhooks.delivery_key) -> when its
    next attempt is due, and the failed attempts so far."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def claim(self, delivery: str, now: float, lease_s: float) -> bool:
        """Take the delivery if it is due, moving it ``lease_s`` ahead so a duplicate
        message leaves it alone (and a crashed attempt is retried once the lease ends)."""
        def claim(pipe: redis.client.Pipeline) -> bool:
            score = pipe.zscore(WEBHOOK_OUTBOX, delivery)
            if score is None or score > now:
                return False  # delivered, given up, or not due yet
            pipe.multi()
            pipe.zadd(WEBHOOK_OUTBOX, {delivery: now + lease_s})
            return True

        with redis_errors():
            return transaction(self._redis, claim, WEBHOOK_OUTBOX)

    def overdue(self, before: float, resent_before: float, limit: int = 1000) -> list[str]:
        """Entries due before ``before`` whose message was not re-sent since
        ``resent_before``."""
        with redis_errors():
            due = self._redis.zrangebyscore(WEBHOOK_OUTBOX, "-inf", before, 0, limit)
            resent = self._redis.hmget(WEBHOOK_RESENT, due) if due else []
        return [delivery for delivery, at in zip(due, resent) if at is None or
                float(at) < resent_before]

    def resent(self, delivery: str, now: float) -> None:
        with redis_errors():
            self._redis.hset(WEBHOOK_RESENT, delivery, now)

    def done(self, delivery: str) -> None:
        with redis_errors():
            self._redis.pipeline().zrem(WEBHOOK_OUTBOX, delivery).hdel(
                WEBHOOK_ATTEMPTS, delivery).hdel(WEBHOOK_RESENT, delivery).execute()

    def failed(self, delivery: str) -> int:
        """Count one more failed attempt; returns the count."""
        with redis_errors():
            return int(self._redis.hincrby(WEBHOOK_ATTEMPTS, delivery, 1))

    def due_at(self, delivery: str, when: float) -> None:
        with redis_errors():
            self._redis.zadd(WEBHOOK_OUTBOX, {delivery: when}, xx=True)


@dataclass(frozen=True)
class Delivery:
    """The settings of one attempt."""

    policy: AddressPolicy
    resolve: Resolve
    send: Send
    master_secret: str
    max_attempts: int
    deadline_s: float


@dataclass(frozen=True)
class Attempt:
    delivery: str
    outcome: Outcome | None           # None: nothing was attempted (not due, or gone)
    retry_in_s: float | None = None   # when the next attempt is due, if there is one


def _try(record: JobRecord, event: Event, delivery: Delivery,
         now: float) -> tuple[Outcome, int | None, str]:
    """One POST: (outcome, HTTP status, detail for the operator's log). Any error is this
    delivery's alone: it never escapes to stop other deliveries."""
    try:
        target = parse_target(record.webhook_url)
        addresses = delivery.policy.check(target, delivery.resolve)
        body = json.dumps({"event": f"job.{event}", "job": record.public()},
                          sort_keys=True).encode()
        headers = {"Content-Type": "application/json",
                   **signed_headers(tenant_secret(delivery.master_secret, record.tenant),
                                    message_id(record.id, event, record.step), int(now), body)}
        status = delivery.send(addresses[0], target, body, headers)
    except (WebhookRefused, InvalidRequest) as exc:  # a URL stored before today's checks
        return Outcome.REFUSED, None, str(exc)
    except DeliveryFailed as exc:
        return Outcome.UNREACHABLE, None, str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad URL must not stop the others
        return Outcome.UNREACHABLE, None, f"{type(exc).__name__}: {exc}"
    if 200 <= status < 300:
        return Outcome.DELIVERED, status, f"HTTP {status}"
    return Outcome.HTTP_ERROR, status, f"HTTP {status}"


def deliver(key: str, outbox: WebhookOutbox, jobs: JobStore, delivery: Delivery,
            now: Callable[[], float]) -> Attempt:
    """Make one attempt of the delivery ``key`` if it is due; record its outcome."""
    if not outbox.claim(key, now(), lease_s=delivery.deadline_s + 30):
        return Attempt(key, None)
    job_id, event = parse_delivery_key(key)
    try:
        record = jobs.get(job_id)
    except JobNotFound:  # expired: nothing left to tell
        outbox.done(key)
        return Attempt(key, None)
    if event is Event.PROGRESS and record.state.terminal:
        outbox.done(key)  # its completion tells more, and a later progress would mislead
        return Attempt(key, None)
    outcome, status, detail = _try(record, event, delivery, now())
    retry_in = None
    if outcome is Outcome.DELIVERED:
        outbox.done(key)
        attempts = int(record.extra.get("webhook", {}).get("attempts", 0)) + 1
        state = "delivered"
    else:
        attempts = outbox.failed(key)
        if (outcome is Outcome.REFUSED or event is Event.PROGRESS
                or attempts >= delivery.max_attempts):
            outbox.done(key)
            state = "failed"
        else:
            retry_in = backoff_s(attempts - 1, RETRY_FIRST_S, RETRY_CAP_S)
            outbox.due_at(key, now() + retry_in)
            state = "retrying"
    if event is Event.COMPLETED:  # what the job's view reports: the final word's fate
        view = {"status": state, "attempts": attempts, "outcome": str(outcome),
                "http_status": status}
        jobs.update(job_id, lambda r: replace(r, extra={**r.extra, "webhook": view}))
    log.info("job %s: webhook %s %s after %d attempt(s): %s (%s)", job_id, event, state,
             attempts, outcome, detail)
    return Attempt(key, outcome, retry_in)


def resend_overdue(outbox: WebhookOutbox, now: float, grace_s: float, resend_after_s: float,
                   send_message: Callable[[str], None]) -> list[str]:
    """Send a message again for each entry due more than ``grace_s`` ago (its message was
    lost: never sent, or held by a worker that died), at most once per ``resend_after_s``
    each, so a stopped webhook worker does not come back to a pile of duplicates."""
    resent = []
    for key in outbox.overdue(now - grace_s, resent_before=now - resend_after_s):
        try:
            send_message(key)
        except T2IError as exc:
            log.warning("webhook %s: message not re-sent: %s", key, exc)
            break
        outbox.resent(key, now)
        resent.append(key)
    return resent

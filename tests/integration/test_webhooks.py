"""Webhook delivery against real Redis and real HTTP servers on loopback: the address policy
at delivery (DNS rebinding), the socket going to the checked address, coarse outcomes, one
bad URL never stopping the others, the total deadline, no redirects."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from core.errors import DeliveryFailed
from core.jobs import JobRecord, JobRequest, JobState
from core.jobstore import WEBHOOK_OUTBOX, JobStore, connect
from core.webhooks import (
    AddressPolicy,
    Event,
    Outcome,
    delivery_key,
    parse_allowlist,
    parse_target,
)
from infra.ports import free_port
from workers.webhooks import Delivery, WebhookOutbox, deliver, http_send

REQUEST = JobRequest("a hooked fox", "", 4, 7.5, 1, 64, 64)


class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every POST with ``status`` (and its server's ``redirect_to`` as Location)."""

    status = 204
    received: list[dict[str, str]] = []

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append(dict(self.headers))
        self.send_response(self.status)
        if 300 <= self.status < 400:
            self.send_header("Location", self.server.redirect_to)  # type: ignore[attr-defined]
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[int, list[dict[str, str]], type[Recorder]]]:
    received: list[dict[str, str]] = []
    handler = type("Handler", (Recorder,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_port, received, handler
    server.shutdown()
    server.server_close()


@pytest.fixture
def jobs(redis_url: str) -> JobStore:
    return JobStore(connect(redis_url), 3600)


def completed(job_id: str) -> str:
    return delivery_key(job_id, Event.COMPLETED)


def finished_job(jobs: JobStore, job_id: str, url: str) -> str:
    """A succeeded job whose webhook is due, as the finishing transaction leaves it."""
    jobs.create(JobRecord(id=job_id, state=JobState.GENERATING, request=REQUEST, model="tiny",
                          submitted_at=time.time(), tenant="acme", webhook_url=url))
    jobs.update(job_id, lambda r: r.transition(JobState.SUCCEEDED, finished_at=time.time()))
    return job_id


def delivery(allow: str = "", resolve=None, deadline_s: float = 2.0) -> Delivery:
    def by_name(host: str, port: int) -> list[str]:
        return [socket.gethostbyname(host)]
    return Delivery(AddressPolicy(parse_allowlist(allow)), resolve or by_name,
                    http_send(deadline_s), "master-secret", max_attempts=3, deadline_s=deadline_s)


def test_a_name_that_resolves_inside_at_delivery_is_refused_and_nothing_is_sent(
        jobs, redis_url, receiver) -> None:
    """DNS rebinding: the name was public when the job was submitted; now it says
    127.0.0.1. The policy is checked again at delivery, so no POST is sent."""
    port, received, _ = receiver
    job_id = finished_job(jobs, "rebound", f"http://rebind.test:{port}/hook")
    attempt = deliver(completed(job_id), WebhookOutbox(connect(redis_url)), jobs,
                      delivery(resolve=lambda host, p: ["127.0.0.1"]), time.time)
    assert attempt.outcome is Outcome.REFUSED and attempt.retry_in_s is None
    assert received == []
    assert jobs.get(job_id).public()["webhook"] == {
        "status": "failed", "attempts": 1, "outcome": "refused by policy", "http_status": None}
    assert connect(redis_url).zscore(WEBHOOK_OUTBOX, completed(job_id)) is None  # given up, not retried


def test_the_post_goes_to_the_checked_address_and_the_name_is_not_looked_up_again(
        jobs, redis_url, receiver) -> None:
    port, received, _ = receiver
    lookups: list[str] = []

    def resolve_once(host: str, p: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"]

    # The name does not exist: had the HTTP client resolved it again, the POST would fail.
    job_id = finished_job(jobs, "pinned", f"http://receiver.invalid:{port}/hook?x=1")
    attempt = deliver(completed(job_id), WebhookOutbox(connect(redis_url)), jobs,
                      delivery(allow=f"127.0.0.1:{port}", resolve=resolve_once), time.time)
    assert attempt.outcome is Outcome.DELIVERED and lookups == ["receiver.invalid"]
    assert received[0]["Host"] == f"receiver.invalid:{port}"
    assert received[0]["webhook-id"] == f"{job_id}.completed"


def test_outcomes_do_not_tell_a_closed_port_from_a_redis_server(jobs, redis_url) -> None:
    """The webhook field is no port scanner: whatever fails to answer HTTP reads the same."""
    closed = free_port()
    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    outbox, views = WebhookOutbox(connect(redis_url)), []
    for job_id, port in (("to-closed", closed), ("to-redis", redis_port)):
        finished_job(jobs, job_id, f"http://127.0.0.1:{port}/")
        attempt = deliver(completed(job_id), outbox, jobs, delivery(allow="127.0.0.0/8"), time.time)
        assert attempt.outcome is Outcome.UNREACHABLE and attempt.retry_in_s == 1
        views.append(jobs.get(job_id).public()["webhook"])
    assert views[0] == views[1] == {"status": "retrying", "attempts": 1,
                                    "outcome": "unreachable", "http_status": None}


@pytest.mark.parametrize("bad_url", ["http://127.0.0.1/a\r\nX-Injected: 1", "http://h:80a/",
                                     "http://[::1/", "http://h:99999/"])
def test_a_bad_url_fails_only_its_own_delivery(jobs, redis_url, receiver, bad_url) -> None:
    """A URL stored before today's checks (or by another writer) fails its delivery, counts
    an attempt and is given up; the next delivery is sent as usual."""
    port, received, _ = receiver
    outbox = WebhookOutbox(connect(redis_url))
    bad = finished_job(jobs, f"bad-{abs(hash(bad_url))}", bad_url)
    good = finished_job(jobs, f"good-{abs(hash(bad_url))}", f"http://127.0.0.1:{port}/ok")
    settings = delivery(allow=f"127.0.0.1:{port}")
    assert deliver(completed(bad), outbox, jobs, settings, time.time).outcome is Outcome.REFUSED
    assert jobs.get(bad).public()["webhook"]["status"] == "failed"
    assert deliver(completed(good), outbox, jobs, settings, time.time).outcome is Outcome.DELIVERED
    assert len(received) == 1


def test_redirects_are_not_followed(jobs, redis_url, receiver) -> None:
    port, received, _ = receiver  # where the redirect points: it must see nothing

    class Redirect(Recorder):
        status = 302
        received = []

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect) as redirecting:
        redirecting.redirect_to = f"http://127.0.0.1:{port}/stolen"  # type: ignore[attr-defined]
        threading.Thread(target=redirecting.serve_forever, daemon=True).start()
        job_id = finished_job(jobs, "redirected",
                              f"http://127.0.0.1:{redirecting.server_port}/hook")
        attempt = deliver(completed(job_id), WebhookOutbox(connect(redis_url)), jobs,
                          delivery(allow="127.0.0.0/8"), time.time)
        redirecting.shutdown()
    assert attempt.outcome is Outcome.HTTP_ERROR
    assert jobs.get(job_id).public()["webhook"]["http_status"] == 302
    assert len(Redirect.received) == 1 and received == []


def test_a_trickling_receiver_is_cut_off_at_the_total_deadline() -> None:
    """Per-read timeouts would let a receiver that sends one byte a second hold a delivery
    for ever; the deadline covers the whole attempt."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        connection, _ = listener.accept()
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"x" * 100:
            if stop.is_set():
                break
            connection.sendall(bytes([byte]))
            time.sleep(0.2)
        connection.close()

    threading.Thread(target=trickle, daemon=True).start()
    target = parse_target(f"http://127.0.0.1:{listener.getsockname()[1]}/")
    started = time.monotonic()
    with pytest.raises(DeliveryFailed):
        http_send(1.5)("127.0.0.1", target, b"{}", {})
    elapsed = time.monotonic() - started
    stop.set()
    listener.close()
    assert 1.4 < elapsed < 3.0, elapsed


def test_a_job_gets_the_events_it_asked_for_and_progress_never_piles_up(
        redis_url, receiver) -> None:
    """started and completed enter the outbox with the transitions that make them; progress
    with the step report, one pending at a time however many steps run; a progress still
    pending when the job finishes is dropped, not sent after the completion."""
    port, received, _ = receiver
    told: list[str] = []
    jobs = JobStore(connect(redis_url), 3600, webhook_due=told.append)
    outbox, settings = WebhookOutbox(connect(redis_url)), delivery(allow=f"127.0.0.1:{port}")
    job_id = "eventful"
    jobs.create(JobRecord(id=job_id, state=JobState.QUEUED, request=REQUEST, model="tiny",
                          submitted_at=time.time(), tenant="acme",
                          webhook_url=f"http://127.0.0.1:{port}/hook",
                          webhook_events="started,progress,completed"))
    jobs.update(job_id, lambda r: r.transition(JobState.TRIAGE))
    jobs.update(job_id, lambda r: r.transition(JobState.QUEUED))  # routed to a GPU queue
    assert told == []
    jobs.update(job_id, lambda r: r.transition(JobState.GENERATING))
    assert told == [f"{job_id}:started"]
    for step in (1, 2, 3):
        jobs.report_progress(job_id, step, 4, progress_webhook=True)
    assert told == [f"{job_id}:started", f"{job_id}:progress"]  # steps 2, 3 joined step 1's

    for key in told:
        assert deliver(key, outbox, jobs, settings, time.time).outcome is Outcome.DELIVERED
    assert [h["webhook-id"] for h in received] == [f"{job_id}.started", f"{job_id}.progress.3"]
    jobs.report_progress(job_id, 4, 4, progress_webhook=True)  # the delivered one made room
    jobs.update(job_id, lambda r: r.transition(JobState.SUCCEEDED, finished_at=time.time()))
    assert told[2:] == [f"{job_id}:progress", f"{job_id}:completed"]
    assert deliver(told[2], outbox, jobs, settings, time.time).outcome is None  # dropped
    assert deliver(told[3], outbox, jobs, settings, time.time).outcome is Outcome.DELIVERED
    assert received[-1]["webhook-id"] == f"{job_id}.completed" and len(received) == 3
    assert all(connect(redis_url).zscore(WEBHOOK_OUTBOX, key) is None for key in told)


def test_a_failed_progress_post_is_not_retried(jobs, redis_url) -> None:
    closed = free_port()
    jobs.create(JobRecord(id="progressing", state=JobState.GENERATING, request=REQUEST,
                          model="tiny", submitted_at=time.time(), tenant="acme",
                          webhook_url=f"http://127.0.0.1:{closed}/", webhook_events="progress"))
    jobs.report_progress("progressing", 1, 4, progress_webhook=True)
    attempt = deliver("progressing:progress", WebhookOutbox(connect(redis_url)), jobs,
                      delivery(allow="127.0.0.0/8"), time.time)
    assert attempt.outcome is Outcome.UNREACHABLE and attempt.retry_in_s is None
    assert connect(redis_url).zscore(WEBHOOK_OUTBOX, "progressing:progress") is None
    assert jobs.get("progressing").public()["webhook"] is None  # the completion's view only

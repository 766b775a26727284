"""Pure logic behind metrics, webhooks and structured logs."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest

from core.backoff import backoff_s
from core.errors import DeliveryFailed, InvalidRequest, WebhookRefused
from core.jobs import JobRecord, JobRequest, JobState
from core.logs import JobContextFilter, JsonFormatter, job_context
from core.metrics import (
    LATENCY_BUCKETS,
    cumulative_buckets,
    merged,
    parse_field,
    sample,
    transition_samples,
)
from core.plan import CachePlan, Reason, Route
from core.webhooks import (
    RETRY_CAP_S,
    RETRY_FIRST_S,
    AddressPolicy,
    parse_allowlist,
    parse_target,
    signed_headers,
    tenant_secret,
    verify,
)

REQUEST = JobRequest("a fox", "", 10, 7.5, 1, 64, 64)


def record(state: JobState, **changes: object) -> JobRecord:
    return replace(JobRecord(id="j1", state=state, request=REQUEST, model="tiny",
                             submitted_at=100.0), **changes)


def test_a_routed_job_counts_its_triage_and_predictor_decision() -> None:
    old = record(JobState.TRIAGE)
    new = record(JobState.QUEUED, route="gen.resume",
                 plan=CachePlan(Route.RESUME, Reason.HIT, predicted_hit=True, audited=False))
    fields = merged(transition_samples(old, new))
    assert fields == {'t2i_triage_decisions_total{reason="hit",route="gen.resume"}': 1.0,
                      't2i_predictor_decisions_total{audited="False",decision="lookup"}': 1.0}


def test_a_resumed_success_counts_outcome_steps_k_and_stage_latencies() -> None:
    old = record(JobState.GENERATING, route="gen.resume")
    new = record(JobState.SUCCEEDED, route="gen.resume", triage_started_at=100.5,
                 triage_finished_at=100.6, generation_started_at=101.0,
                 generation_finished_at=103.0, finished_at=103.0, extra={"resumed_from_k": 4})
    fields = merged(transition_samples(old, new))
    assert fields['t2i_jobs_finished_total{outcome="succeeded",route="gen.resume"}'] == 1
    assert fields["t2i_steps_requested_total{}"] == 10
    assert fields["t2i_steps_saved_total{}"] == 4
    assert fields['t2i_cache_resumes_total{k="4"}'] == 1
    assert fields['t2i_stage_seconds_sum{stage="generate"}'] == pytest.approx(2.0)
    assert fields['t2i_stage_seconds_bucket_raw{le="2.5",stage="generate"}'] == 1
    assert fields['t2i_stage_seconds_sum{stage="total"}'] == pytest.approx(3.0)


def test_an_exact_path_success_counts_its_decision_and_every_step_saved() -> None:
    exact = CachePlan(Route.EXACT, Reason.EXACT_REPEAT, entry="j0", k=10)
    fields = merged(transition_samples(record(JobState.TRIAGE),
                                       record(JobState.SUCCEEDED, plan=exact, finished_at=101.0)))
    assert fields['t2i_triage_decisions_total{reason="exact repeat",route="exact"}'] == 1
    assert fields['t2i_jobs_finished_total{outcome="succeeded",route="exact"}'] == 1
    assert fields["t2i_steps_saved_total{}"] == fields["t2i_steps_requested_total{}"] == 10
    assert not any(field.startswith("t2i_cache_resumes_total") for field in fields)


def test_only_the_first_arrival_at_a_final_state_counts() -> None:
    done = record(JobState.SUCCEEDED, finished_at=101.0)
    assert transition_samples(done, replace(done, extra={"webhook": "delivered"})) == []
    assert transition_samples(record(JobState.GENERATING), record(JobState.GENERATING,
                                                                  step=3)) == []
    cancelled = transition_samples(record(JobState.QUEUED), record(JobState.CANCELLED))
    assert [s.field for s in cancelled] == [
        't2i_jobs_finished_total{outcome="cancelled",route="none"}']


def test_fields_round_trip_and_buckets_cumulate() -> None:
    item = sample("t2i_x_total", 2, route="gen.full", k=5)
    assert parse_field(item.field) == ("t2i_x_total", {"k": "5", "route": "gen.full"})
    cumulated = cumulative_buckets({"0.5": 2, "+Inf": 1, str(LATENCY_BUCKETS[0]): 1})
    assert cumulated[0] == (str(LATENCY_BUCKETS[0]), 1)
    assert dict(cumulated)["0.5"] == 3 and cumulated[-1] == ("+Inf", 4)


def test_signatures_verify_only_with_the_right_secret_body_and_time() -> None:
    secret = tenant_secret("master", "acme")
    assert secret.startswith("whsec_") and secret != tenant_secret("master", "globex")
    headers = signed_headers(secret, "job-1", 1000, b'{"a":1}')
    assert verify(secret, headers, b'{"a":1}', now=1100)
    assert verify(secret, {k.upper(): v for k, v in headers.items()}, b'{"a":1}', now=1100)
    assert not verify(secret, headers, b'{"a":2}', now=1100)
    assert not verify(secret, {**headers, "webhook-id": "job-2"}, b'{"a":1}', now=1100)
    assert not verify(tenant_secret("master", "globex"), headers, b'{"a":1}', now=1100)
    assert not verify(secret, headers, b'{"a":1}', now=2000)  # too old: a replay
    assert not verify(secret, {"webhook-signature": "garbage"}, b'{"a":1}', now=1000)


def test_signatures_are_standard_webhooks_as_its_reference_library_checks_them() -> None:
    """Receivers can use Standard Webhooks' own libraries (here its Python one)."""
    import time

    from standardwebhooks.webhooks import Webhook, WebhookVerificationError

    secret, body = tenant_secret("master", "acme"), b'{"event":"job.finished"}'
    headers = signed_headers(secret, "job-1", int(time.time()), body)
    assert Webhook(secret).verify(body, headers) == {"event": "job.finished"}
    with pytest.raises(WebhookVerificationError):
        Webhook(tenant_secret("master", "globex")).verify(body, headers)


def test_retry_delays_double_up_to_a_cap() -> None:
    assert [backoff_s(n, RETRY_FIRST_S, RETRY_CAP_S) for n in (0, 1, 2, 3)] == [1, 2, 4, 8]
    assert backoff_s(29, RETRY_FIRST_S, RETRY_CAP_S) == 600


@pytest.mark.parametrize("url", [
    "ftp://example.com/x", "example.com", "http://", 42, "https://h/" + "x" * 2000,
    "http://example.com/a\r\nX-Injected: 1", "http://example.com/a b", "http://example.com:80a/",
    "http://[::1/", "http://user:pw@example.com/", "http://exämple.com/",
    "http://example.com:0/", "http://example.com:99999/"])
def test_bad_webhook_urls_are_refused_naming_the_field(url: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_target(url)
    assert caught.value.field == "webhook_url"


def test_a_webhook_target_keeps_what_the_request_needs() -> None:
    target = parse_target("https://Hooks.Example.com/in?x=1#frag")
    assert (target.scheme, target.host, target.port, target.target) == \
        ("https", "hooks.example.com", 443, "/in?x=1")
    assert target.host_header == "hooks.example.com"
    assert parse_target("http://[2001:db8::1]:8080").host_header == "[2001:db8::1]:8080"


INTERNAL = ["127.0.0.1", "127.1.2.3", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254",
            "100.64.0.1", "0.0.0.0", "255.255.255.255", "224.0.0.1", "240.0.0.1", "192.0.2.1",
            "::1", "::", "fe80::1", "fe80::1%eth0", "fd00::1", "fec0::1", "ff02::1", "::ffff:127.0.0.1",
            "::ffff:10.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2"]


@pytest.mark.parametrize("address", INTERNAL)
def test_internal_addresses_in_any_spelling_are_refused(address: str) -> None:
    assert AddressPolicy().refusal(address, 80)
    with pytest.raises(WebhookRefused):
        AddressPolicy().check(parse_target("http://hook.test/"), lambda host, port: [address])


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_unicast_addresses_are_allowed(address: str) -> None:
    assert AddressPolicy().refusal(address, 443) is None


def test_every_address_of_a_name_is_checked_and_the_checked_ones_returned() -> None:
    target = parse_target("https://hook.test/")
    assert AddressPolicy().check(target, lambda h, p: ["8.8.8.8", "8.8.8.8", "1.1.1.1"]) == \
        ["8.8.8.8", "1.1.1.1"]
    with pytest.raises(WebhookRefused, match="loopback"):
        AddressPolicy().check(target, lambda h, p: ["8.8.8.8", "127.0.0.1"])

    def unresolvable(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    with pytest.raises(DeliveryFailed, match="does not resolve"):  # may pass: retried
        AddressPolicy().check(target, unresolvable)


def test_an_operator_allowlist_opens_named_networks_and_ports_only() -> None:
    policy = AddressPolicy(parse_allowlist("10.1.0.0/16, 127.0.0.1:9000, [fd00::1]:443"))
    assert policy.refusal("10.1.2.3", 80) is None
    assert policy.refusal("10.2.0.1", 80)
    assert policy.refusal("127.0.0.1", 9000) is None
    assert policy.refusal("127.0.0.1", 9333)  # the object store's admin port stays closed
    assert policy.refusal("fd00::1", 443) is None and policy.refusal("fd00::1", 80)
    assert AddressPolicy(parse_allowlist("")).allow == ()
    with pytest.raises(ValueError, match="'10.0.0.0/33'"):
        parse_allowlist("10.0.0.0/33")
    with pytest.raises(ValueError, match="'localhost:80'"):
        parse_allowlist("localhost:80")


def test_json_log_lines_carry_the_job_id_inside_a_job_only() -> None:
    logger = logging.getLogger("t2i.test")
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, entry: logging.LogRecord) -> None:
            lines.append(self.format(entry))

    handler = Collect()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(JobContextFilter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with job_context("abc123", "triage"):
            logger.info("routed %s", "here")
        logger.info("idle")
    finally:
        logger.removeHandler(handler)
    inside, outside = (json.loads(line) for line in lines)
    assert inside["job_id"] == "abc123" and inside["stage"] == "triage"
    assert inside["message"] == "routed here" and inside["level"] == "INFO"
    assert "job_id" not in outside


def test_webhook_events_filter_names_its_bad_value() -> None:
    from core.webhooks import Event, parse_events

    assert parse_events(["completed", "started"]) == (Event.STARTED, Event.COMPLETED)
    for bad, named in ((["finished"], "'finished' is not an event"), ([], "non-empty list"),
                       ("completed", "non-empty list"), ([3], "3 is not an event")):
        with pytest.raises(InvalidRequest, match=named) as caught:
            parse_events(bad)
        assert caught.value.field == "webhook_events_filter"


def test_delivery_keys_name_job_and_event_and_old_entries_are_completions() -> None:
    from core.webhooks import Event, delivery_key, message_id, parse_delivery_key

    assert parse_delivery_key(delivery_key("abc", Event.PROGRESS)) == ("abc", Event.PROGRESS)
    assert parse_delivery_key("abc") == ("abc", Event.COMPLETED)  # queued before events
    assert message_id("abc", Event.PROGRESS, 7) == "abc.progress.7"
    assert message_id("abc", Event.COMPLETED, 7) == "abc.completed"


def test_a_transition_makes_only_the_events_the_job_wants() -> None:
    from core.webhooks import Event

    queued = JobRecord(id="j", state=JobState.QUEUED, request=JobRequest("x", "", 4, 7.5, 1,
                                                                         64, 64),
                       model="tiny", submitted_at=0.0, webhook_url="https://example.com/h")
    running = queued.transition(JobState.GENERATING)
    done = running.transition(JobState.SUCCEEDED)
    assert running.events_due(queued) == [] and done.events_due(running) == [Event.COMPLETED]
    every = replace(queued, webhook_events="started,progress,completed")
    assert every.transition(JobState.GENERATING).events_due(every) == [Event.STARTED]
    assert replace(done, webhook_url="").events_due(running) == []  # no webhook
    assert done.public()["webhook_events_filter"] == ["completed"]

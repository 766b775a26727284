"""Pure logic behind metrics, webhooks and structured logs."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest

from core.errors import InvalidRequest
from core.jobs import JobRecord, JobRequest, JobState
from core.logs import JobContextFilter, JsonFormatter, job_context
from core.metrics import (LATENCY_BUCKETS, cumulative_buckets, merged, parse_field, sample,
                          transition_samples)
from core.webhooks import check_url, retry_delay_s, sign, tenant_secret, verify

REQUEST = JobRequest("a fox", "", 10, 7.5, 1, 64, 64)


def record(state: JobState, **changes: object) -> JobRecord:
    return replace(JobRecord(id="j1", state=state, request=REQUEST, model="tiny",
                             submitted_at=100.0), **changes)


def test_a_routed_job_counts_its_triage_and_predictor_decision() -> None:
    old = record(JobState.TRIAGE)
    new = record(JobState.QUEUED, route="gen.resume", route_reason="hit",
                 extra={"predicted_hit": True, "predictor_audit": False})
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
    assert secret != tenant_secret("master", "globex")
    header = sign(secret, 1000, b'{"a":1}')
    assert verify(secret, header, b'{"a":1}', now=1100)
    assert not verify(secret, header, b'{"a":2}', now=1100)
    assert not verify(tenant_secret("master", "globex"), header, b'{"a":1}', now=1100)
    assert not verify(secret, header, b'{"a":1}', now=2000)  # too old: a replay
    assert not verify(secret, "garbage", b'{"a":1}', now=1000)


def test_retry_delays_double_up_to_a_cap() -> None:
    assert [retry_delay_s(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert retry_delay_s(30) == 600


@pytest.mark.parametrize("url", ["ftp://example.com/x", "example.com", "http://", 42,
                                 "https://h/" + "x" * 2000])
def test_bad_webhook_urls_are_refused_naming_the_field(url: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_url(url)
    assert caught.value.field == "webhook_url"


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

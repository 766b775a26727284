"""Request validation and the job-record state machine (pure, no servers)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import InvalidRequest, InvalidTransition
from core.jobs import (
    ALLOWED_TRANSITIONS,
    JobRecord,
    JobRequest,
    JobState,
    RequestLimits,
    image_key,
    parse_request,
)

LIMITS = RequestLimits(default_steps=50, max_steps=150, default_size=512, max_size=1024,
                       default_guidance=7.5, max_prompt_chars=100)


def parse(**payload):
    return parse_request(payload, LIMITS, random_seed=42)


def test_defaults_fill_missing_fields_and_seed_is_fixed():
    request = parse(prompt="  a red fox  ")
    assert request == JobRequest(prompt="a red fox", negative_prompt="", steps=50, guidance=7.5,
                                 seed=42, width=512, height=512)


def test_explicit_values_are_kept():
    request = parse(prompt="x", negative_prompt="blurry", steps=20, guidance=3, seed=7,
                    width=64, height=1024)
    assert (request.steps, request.guidance, request.seed, request.width, request.height) == \
        (20, 3.0, 7, 64, 1024)


@pytest.mark.parametrize("payload, field, fragment", [
    ({}, "prompt", "required"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": " \n\t "}, "prompt", "empty"),
    ({"prompt": "x" * 101}, "prompt", "101 characters"),
    ({"prompt": 5}, "prompt", "string"),
    ({"prompt": "bad\x00byte"}, "prompt", "control character"),
    ({"prompt": "lone \ud800 surrogate"}, "prompt", "UTF-8"),
    ({"prompt": "x", "steps": 0}, "steps", "0 is out of range"),
    ({"prompt": "x", "steps": -5}, "steps", "-5 is out of range"),
    ({"prompt": "x", "steps": 10**9}, "steps", "out of range"),
    ({"prompt": "x", "steps": "50"}, "steps", "integer"),
    ({"prompt": "x", "steps": True}, "steps", "integer"),
    ({"prompt": "x", "steps": 2.5}, "steps", "integer"),
    ({"prompt": "x", "width": 500}, "width", "500 is not a multiple of 8"),
    ({"prompt": "x", "height": 2048}, "height", "2048 is out of range"),
    ({"prompt": "x", "height": 32}, "height", "32 is out of range"),
    ({"prompt": "x", "seed": "abc"}, "seed", "integer"),
    ({"prompt": "x", "seed": -1}, "seed", "out of range"),
    ({"prompt": "x", "guidance": float("nan")}, "guidance", "out of range"),
    ({"prompt": "x", "guidance": 99}, "guidance", "out of range"),
    ({"prompt": "x", "colour": "red"}, "colour", "unknown field"),
])
def test_invalid_requests_name_the_field_and_value(payload, field, fragment):
    with pytest.raises(InvalidRequest) as caught:
        parse_request(payload, LIMITS, random_seed=1)
    assert caught.value.field == field
    assert fragment in str(caught.value)


def test_non_object_body_is_refused():
    with pytest.raises(InvalidRequest, match="body"):
        parse_request(["prompt"], LIMITS, random_seed=1)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["prompt", "steps", "width", "seed", "guidance", "x"]),
                       st.one_of(st.none(), st.integers(-10**6, 10**6), st.text(max_size=120),
                                 st.floats(allow_nan=True), st.booleans())))
def test_parse_either_returns_a_valid_request_or_raises_invalid_request(payload):
    try:
        request = parse_request(payload, LIMITS, random_seed=3)
    except InvalidRequest as exc:
        assert exc.field in (*payload.keys(), "prompt")
        return
    assert request.prompt.strip() and 1 <= request.steps <= LIMITS.max_steps
    assert request.width % 8 == 0 and 64 <= request.width <= LIMITS.max_size


def record(state=JobState.QUEUED):
    return JobRecord(id="j1", state=state, request=parse(prompt="a cat"), model="tiny",
                     submitted_at=100.0)


def test_happy_path_transitions():
    r = record()
    r = r.transition(JobState.TRIAGE, triage_started_at=101.0)
    r = r.transition(JobState.QUEUED, route="gen.full", triage_finished_at=102.0)
    r = r.transition(JobState.GENERATING, generation_started_at=103.0)
    r = r.transition(JobState.SUCCEEDED, image_key=image_key("j1"), finished_at=104.0)
    assert r.state is JobState.SUCCEEDED and r.state.terminal
    assert r.image_key == "images/j1.png"


@pytest.mark.parametrize("terminal", [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED])
@pytest.mark.parametrize("target", list(JobState))
def test_terminal_states_are_final(terminal, target):
    with pytest.raises(InvalidTransition):
        record(terminal).transition(target)


def test_redelivery_and_progress_are_self_transitions():
    assert JobState.TRIAGE in ALLOWED_TRANSITIONS[JobState.TRIAGE]
    assert record(JobState.GENERATING).transition(JobState.GENERATING, step=3).step == 3


def test_generating_cannot_go_back_to_queue():
    with pytest.raises(InvalidTransition, match="generating -> queued"):
        record(JobState.GENERATING).transition(JobState.QUEUED)


def test_record_round_trips_through_redis_fields():
    r = dataclasses.replace(record(JobState.GENERATING), step=4, total_steps=10,
                            triage_started_at=101.5, cancel_requested=True,
                            extra={"similarity": 0.93})
    fields = r.to_fields()
    assert all(isinstance(v, str) for v in fields.values())
    assert JobRecord.from_fields(fields) == r


def test_public_view_has_progress_timings_and_no_internals():
    view = record(JobState.GENERATING).public()
    assert view["state"] == "generating"
    assert view["progress"] == {"step": 0, "total": 0}
    assert view["timings"]["submitted_at"] == 100.0
    assert "worker" not in view


def test_a_stranded_job_goes_back_to_the_queue_of_its_stage_or_fails_after_enough_tries():
    from core.reconcile import GiveUp, Requeue, stranded_action

    request = JobRequest("a fox", "", 10, 7.5, 1, 64, 64)
    LIVE = lambda job_id: True  # noqa: E731 - no follower here

    def record(state: JobState, **fields: object) -> JobRecord:
        return JobRecord(id="j", state=state, request=request, model="tiny", submitted_at=0.0,
                         **fields)

    assert stranded_action(record(JobState.QUEUED), "triage.route", 3, LIVE) == Requeue("triage.route")
    assert stranded_action(record(JobState.TRIAGE, route="gen.full"), "triage.route", 3, LIVE) == \
        Requeue("triage.route")  # triage starts over: its decision may be out of date
    assert stranded_action(record(JobState.QUEUED, route="gen.resume"), "triage.route", 3, LIVE) == \
        Requeue("gen.resume")
    assert stranded_action(record(JobState.GENERATING, route="gen.full"), "triage.route", 3, LIVE) \
        == Requeue("gen.full")
    gave_up = stranded_action(record(JobState.GENERATING, route="gen.full", requeues=3),
                              "triage.route", 3, LIVE)
    assert isinstance(gave_up, GiveUp) and "lost 3 times" in gave_up.reason
    assert stranded_action(record(JobState.SUCCEEDED), "triage.route", 3, LIVE) is None


def test_a_follower_of_an_identical_job_waits_while_that_job_lives_then_goes_to_triage():
    from core.plan import CachePlan, Reason, Route
    from core.reconcile import Requeue, Wait, stranded_action

    follower = JobRecord(id="f", state=JobState.QUEUED, model="tiny", submitted_at=0.0,
                         request=JobRequest("a fox", "", 10, 7.5, 1, 64, 64),
                         plan=CachePlan(Route.EXACT, Reason.IN_FLIGHT, "p", entry="leader"))
    asked: list[str] = []

    def live(job_id: str) -> bool:
        asked.append(job_id)
        return job_id == "leader"

    assert stranded_action(follower, "triage.route", 3, live) == Wait() and asked == ["leader"]
    orphan = dataclasses.replace(follower, plan=dataclasses.replace(follower.plan, entry="gone"))
    assert stranded_action(orphan, "triage.route", 3, live) == Requeue("triage.route")


def test_records_written_before_typed_plans_still_read():
    """The fields the previous version stored: the plan is rebuilt from them."""
    from core.plan import Reason, Route

    older = {"id": "old", "state": "succeeded", "model": "tiny", "submitted_at": "1.0",
             "request": JobRequest("a fox", "", 10, 7.5, 1, 64, 64).to_json(),
             "route": "gen.resume", "route_reason": "hole fallback",
             "extra": json.dumps({"k": 3, "wanted_k": 4, "matched_entry": "e1",
                                  "partition": "p1", "similarity": 0.93, "lookup_hit": True,
                                  "unet_calls": 7})}
    record = JobRecord.from_fields(older)
    plan = record.plan
    assert (plan.route, plan.reason, plan.entry, plan.partition, plan.k, plan.wanted_k) == \
        (Route.RESUME, Reason.HOLE, "e1", "p1", 3, 4) and plan.looked_up
    assert record.public()["cache"] == {"route": "resume", "k": 3, "similarity": 0.93,
                                        "reason": "hole fallback", "fallback": None, "seed_rule": None}
    assert JobRecord.from_fields(record.to_fields()) == record
    routed_in_full = JobRecord.from_fields({**older, "route": "gen.full", "route_reason": "miss",
                                            "extra": "{}"})
    assert routed_in_full.plan.route is Route.FULL and routed_in_full.plan.reason is Reason.MISS
    assert JobRecord.from_fields({k: v for k, v in older.items() if k != "route"}).plan is None


def test_the_public_view_has_no_internal_ids_or_task_names():
    from core.plan import CachePlan, Reason, Route

    record = JobRecord(id="j", state=JobState.SUCCEEDED, model="tiny", submitted_at=0.0,
                       request=JobRequest("a fox", "", 10, 7.5, 1, 64, 64), route="gen.resume",
                       image_key="images/j.png", deliveries=2, worker="gpu@h pid 1",
                       plan=CachePlan(Route.RESUME, Reason.HIT, "partition-hash", "entry-id",
                                      5, 5, 0.97, looked_up=True, predictor="v1", table="ref"))
    text = json.dumps(record.public())
    for internal in ("partition-hash", "entry-id", "gen.resume", "images/j.png", "gpu@h",
                     "deliveries", "v1"):
        assert internal not in text, internal
    assert record.public()["cache"] == {"route": "resume", "k": 5, "similarity": 0.97,
                                        "reason": "hit", "fallback": None, "seed_rule": None}


def test_a_delivered_message_is_orphaned_once_old_enough_and_named_by_no_live_lease() -> None:
    from core.reconcile import orphaned

    delivered_at = {"held": 90.0, "dead-workers": 90.0, "a-lease-ago": 100.0,
                    "just-delivered": 125.0}
    claimed = {"held"}
    assert orphaned(delivered_at, claimed, now=130.0, lease_s=30.0) == {"dead-workers",
                                                                        "a-lease-ago"}
    # a message its holder has not yet had a whole lease to name is not judged
    assert orphaned(delivered_at, claimed, now=129.9, lease_s=30.0) == {"dead-workers"}
    assert orphaned({}, set(), now=1e9, lease_s=30.0) == set()

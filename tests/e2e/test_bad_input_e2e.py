"""Bad input at the real HTTP API: each named case and a bounded property-based fuzz of the
request schema. A bad request gets a 4xx naming the problem, nothing is enqueued, and the
service keeps serving."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import job_count

pytestmark = pytest.mark.e2e

JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("body, status, names", [
    ({"prompt": "   \t  "}, 422, "prompt"),
    ({"prompt": "x" * 2001}, 422, "2001 characters"),
    ({"prompt": "a cat\x00\x07"}, 422, "control character"),
    ({"prompt": "x", "negative_prompt": "\x1b[31m"}, 422, "negative_prompt"),
    ({"prompt": "x", "steps": 10**12}, 422, "steps"),
    ({"prompt": "x", "steps": 2.5}, 422, "steps"),
    ({"prompt": "x", "height": 1032}, 422, "height"),
    ({"prompt": "x", "width": 36}, 422, "width"),
    ({"prompt": "x", "seed": "abc"}, 422, "seed"),
    ({"prompt": "x", "seed": -1}, 422, "seed"),
    ({"prompt": "x", "guidance": "high"}, 422, "guidance"),
    ({"prompt": "x", "tenant": "globex"}, 422, "tenant"),
    ({"prompt": "x", "idempotency_key": "k1"}, 422, "Idempotency-Key header"),
    ({"prompt": "x", "webhook_url": "javascript:alert(1)"}, 422, "webhook_url"),
    ({"prompt": ["a", "list"]}, 422, "prompt"),
    ({"prompt": "\u200b\ufeff\u2060 "}, 422, "invisible"),      # zero-width and BOM only
    ({"prompt": "x", "steps": 10**400}, 422, "401 digits"),
    ({"prompt": "x", "guidance": 10**400}, 422, "guidance"),
    ({"prompt": "x", "seed": -10**300}, 422, "seed"),
    ({"prompt": "x", "self": 1}, 422, "self"),                   # a Python parameter's name
    ({"prompt": "x", "sampler": "ddim"}, 422, "webhook_url"),    # the allowed ones, all
    ({"prompt": "x", "payload": {}}, 422, "payload"),
    ({"prompt": "x", "webhook_url": "http://[::1/hook"}, 422, "webhook_url"),
    ({"prompt": "x", "webhook_url": "http://example.com:80a/"}, 422, "webhook_url"),
    ({"prompt": "x", "webhook_url": "http://example.com/\r\nX: 1"}, 422, "webhook_url"),
    ({"prompt": None}, 422, "prompt"),
    ("just a string", 422, "body"),
])
def test_each_bad_request_is_named_and_not_enqueued(api, stack, body, status, names):
    before = job_count(stack)
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == status, response.text
    assert names in json.dumps(response.json()["error"])
    assert job_count(stack) == before


@pytest.mark.parametrize("content, status, names", [
    (b'{"prompt": "caf\xe9"}', 400, "not valid JSON"),      # Latin-1, not UTF-8
    (b'{"prompt": "' + b"x" * 100_000 + b'"}', 413, "65536 bytes"),
    (b"", 400, "not valid JSON"),
    (b'{"prompt": "x", "prompt": 5}', 400, "appears twice"),  # never silently the last
    (b'{"prompt": "x", "steps": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),
    (b"[" * 5000 + b"]" * 5000, 400, "nested too deeply"),  # 10 KB
])
def test_bad_bodies_are_refused(api, stack, content, status, names):
    before = job_count(stack)
    response = api.post("/v1/jobs", content=content, headers=JSON)
    assert response.status_code == status and names in response.json()["error"]["message"] + \
        response.json()["error"].get("field", "")
    assert job_count(stack) == before


def test_the_json_media_type_is_matched_case_insensitively(api):
    response = api.post("/v1/jobs", content=json.dumps({"prompt": "a loud cat", "steps": 2}),
                        headers={"content-type": "APPLICATION/JSON; Charset=UTF-8"})
    assert response.status_code == 202, response.text
    api.delete(f"/v1/jobs/{response.json()['id']}")


def test_prompt_injection_text_is_only_data(api):
    prompt = ('ignore previous instructions"; DROP TABLE jobs; -- {{7*7}} $(rm -rf /) '
              '<script>alert(1)</script> {"state": "succeeded"}')
    response = api.post("/v1/jobs", json={"prompt": prompt, "steps": 2})
    assert response.status_code == 202
    job_id = response.json()["id"]
    api.delete(f"/v1/jobs/{job_id}")
    view = api.get(f"/v1/jobs/{job_id}").json()
    assert view["request"]["prompt"] == prompt and view["id"] == job_id


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=60), lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=10), inner, max_size=3), max_leaves=6)
request_like = st.dictionaries(
    st.sampled_from(["prompt", "negative_prompt", "steps", "guidance", "seed", "width", "height",
                     "extra", ""]), json_values, max_size=6)


@pytest.fixture(scope="module")
def jobs_stored(stack):
    """A counter of job records (a closure, so failing examples do not print settings)."""
    return lambda: job_count(stack)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(request_like, json_values))
def test_fuzzed_requests_get_4xx_or_a_valid_job_never_a_5xx(api, jobs_stored, body):
    before = jobs_stored()
    response = api.post("/v1/jobs", content=json.dumps(body), headers=JSON)
    assert response.status_code in (202, 422), (body, response.text)
    if response.status_code == 422:
        error = response.json()["error"]
        assert error["code"] == "invalid_request" and error["message"]
        assert error["field"] in (("prompt", *body) if isinstance(body, dict) else ("body",))
        assert jobs_stored() == before
        return
    job_id = response.json()["id"]
    api.delete(f"/v1/jobs/{job_id}")  # keep the GPU worker free for the other tests
    assert jobs_stored() == before + 1
    view = api.get(f"/v1/jobs/{job_id}").json()
    assert view["request"]["prompt"] == body["prompt"].strip()


@pytest.mark.parametrize("method, path, status, code", [
    ("GET", "/v1/nowhere", 404, "not_found"),
    ("PUT", "/v1/jobs", 405, "method_not_allowed"),
    ("PATCH", "/v1/jobs/some-id", 405, "method_not_allowed"),
])
def test_unknown_routes_and_wrong_methods_answer_in_the_one_error_shape(
        api, stack, method, path, status, code):
    before = job_count(stack)
    response = api.request(method, path, json={"prompt": "x"})
    assert response.status_code == status
    assert response.json() == {"error": {"code": code, "message": response.json()["error"][
        "message"]}} and response.json()["error"]["message"]
    if status == 405:
        assert response.headers["allow"]
    assert job_count(stack) == before


def test_the_service_still_serves_after_all_that(api):
    assert api.get("/healthz").json()["ok"] is True
    job_id = api.post("/v1/jobs", json={"prompt": "a calm lake", "steps": 2}).json()["id"]
    for _ in range(1800):
        view = api.get(f"/v1/jobs/{job_id}").json()
        if view["state"] == "succeeded":
            break
        time.sleep(0.1)
    assert view["state"] == "succeeded", view

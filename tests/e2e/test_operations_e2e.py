"""What operators and web-backend developers touch: /metrics, structured logs, idempotent
submission, long-poll and server-sent events, the asyncio client, webhooks and the OpenAPI
document, against the real stack (Redis, S3, Celery workers, uvicorn)."""

from __future__ import annotations

import asyncio
import http.server
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import OTHER_KEY, TENANT_KEY, WEBHOOK_PORT, job_count
from core.errors import IdempotencyConflict, InvalidRequest
from core.jobs import SUBMISSION_FIELDS
from core.webhooks import ID_HEADER, TIMESTAMP_HEADER, verify
from producer.aio import AsyncClient

pytestmark = pytest.mark.e2e

SMALL = {"steps": 4, "width": 64, "height": 64}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one series in a Prometheus text exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        found = dict(re.findall(r'(\w+)="([^"]*)"', series))
        if series.split("{")[0] == name and found == labels:
            return float(value)
    return 0.0


def finished(api: httpx.Client, job_id: str) -> dict:
    view = api.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
    assert view["state"] == "succeeded", view
    return view


def test_metrics_move_with_a_job(api: httpx.Client) -> None:
    before = api.get("/metrics").text
    job_id = api.post("/v1/jobs", json={"prompt": "a metric lighthouse", **SMALL}).json()["id"]
    finished(api, job_id)
    after = api.get("/metrics")
    assert after.status_code == 200 and after.headers["content-type"].startswith("text/plain")
    text = after.text
    done = {"route": "gen.full", "outcome": "succeeded"}
    assert metric(text, "t2i_up") == 1
    assert metric(text, "t2i_jobs_finished_total", **done) == \
        metric(before, "t2i_jobs_finished_total", **done) + 1
    assert metric(text, "t2i_jobs_submitted_total") >= metric(before, "t2i_jobs_submitted_total") + 1
    assert metric(text, "t2i_steps_requested_total") >= metric(before, "t2i_steps_requested_total") + 4
    for stage in ("triage", "wait", "generate", "total"):
        assert metric(text, "t2i_stage_seconds_count", stage=stage) >= 1
        assert metric(text, "t2i_stage_seconds_bucket", stage=stage, le="+Inf") == \
            metric(text, "t2i_stage_seconds_count", stage=stage)
    assert metric(text, "t2i_queue_depth", queue="gen.full") >= 0
    assert "t2i_cache_items " in text and "t2i_cache_hit_ratio " in text
    assert metric(text, "t2i_api_requests_total", method="POST", route="/v1/jobs",
                  status="202") >= 1


def test_metrics_count_a_resume_its_k_and_the_steps_saved(api: httpx.Client) -> None:
    body = {"prompt": "a metric windmill by a canal", **SMALL, "steps": 10, "seed": 5}
    before = api.get("/metrics").text
    finished(api, api.post("/v1/jobs", json=body).json()["id"])
    deadline = time.monotonic() + 60  # its latents are registered after the job finished
    while metric(api.get("/metrics").text, "t2i_cache_items") <= metric(before, "t2i_cache_items"):
        assert time.monotonic() < deadline, "the first job's latents were never cached"
        time.sleep(0.2)
    # The same seed, another negative prompt: not identical, so it resumes (uncapped).
    again = finished(api, api.post("/v1/jobs", json={**body, "negative_prompt": "blurry"}
                                   ).json()["id"])
    assert again["cache"]["route"] == "resume", again
    after = api.get("/metrics").text
    k = str(again["cache"]["k"])
    assert metric(after, "t2i_cache_resumes_total", k=k) == \
        metric(before, "t2i_cache_resumes_total", k=k) + 1
    assert metric(after, "t2i_steps_saved_total") == \
        metric(before, "t2i_steps_saved_total") + again["cache"]["k"]
    assert metric(after, "t2i_triage_decisions_total", route="gen.resume", reason="hit") >= 1
    assert 0 < metric(after, "t2i_cache_hit_ratio") <= 1
    identical = finished(api, api.post("/v1/jobs", json=body).json()["id"])
    assert identical["cache"]["route"] == "exact", identical
    last = api.get("/metrics").text
    assert metric(last, "t2i_steps_saved_total") == metric(after, "t2i_steps_saved_total") + 10
    assert metric(last, "t2i_triage_decisions_total", route="exact", reason="exact repeat") == \
        metric(after, "t2i_triage_decisions_total", route="exact", reason="exact repeat") + 1


def test_worker_logs_are_json_lines_naming_the_job(api: httpx.Client, base_dir: Path) -> None:
    job_id = api.post("/v1/jobs", json={"prompt": "a logged heron", **SMALL}).json()["id"]
    finished(api, job_id)
    expected = {"triage.route", "gen.full", "cache.register"}  # registering comes after
    deadline, stages = time.monotonic() + 30, set()
    while not expected <= stages and time.monotonic() < deadline:
        time.sleep(0.2)
        for name in ("triage-test", "gpu-test"):
            for line in (base_dir / "logs" / f"{name}.log").read_text().splitlines():
                entry = json.loads(line) if line.startswith("{") else {}
                if entry.get("job_id") == job_id:
                    assert {"ts", "level", "logger", "pid", "message"} <= entry.keys()
                    stages.add(entry["stage"])
                elif job_id in entry.get("message", "") and entry["logger"].startswith("workers."):
                    pytest.fail(f"a line of ours names the job but has no job_id: {line}")
    assert expected <= stages, stages


def test_idempotent_submission(api: httpx.Client, stack) -> None:
    body = {"prompt": "an idempotent otter", **SMALL}
    count = job_count(stack)
    first = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "req-42"})
    again = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "req-42"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert job_count(stack) == count + 1
    changed = api.post("/v1/jobs", json={**body, "seed": 9}, headers={"Idempotency-Key": "req-42"})
    assert changed.status_code == 409
    assert changed.json()["error"]["code"] == "idempotency_conflict"
    bad = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "has space"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "Idempotency-Key"
    assert job_count(stack) == count + 1


def test_long_poll_answers_when_the_job_finishes(api: httpx.Client) -> None:
    job_id = api.post("/v1/jobs", json={"prompt": "a patient snail", **SMALL}).json()["id"]
    started = time.monotonic()
    view = api.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
    assert view["state"] == "succeeded" and time.monotonic() - started < 60
    bad = api.get(f"/v1/jobs/{job_id}", params={"wait": "soon"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "wait"
    assert api.get(f"/v1/jobs/{job_id}", params={"wait": 61}).status_code == 422


def test_the_cli_works_against_a_deployment_over_http(stack, tmp_path: Path) -> None:
    """`t2i --api-url URL --api-key KEY`: submit with a progress bar, status, result and
    errors, all over the HTTP API (the Redis it would use otherwise is not there)."""
    import os
    import subprocess
    import sys

    from infra.ports import free_port

    env = {**os.environ, "T2I_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
           "T2I_API_URL": f"http://{stack.api_host}:{stack.api_port}",
           "T2I_API_KEY": TENANT_KEY}
    t2i = [str(Path(sys.executable).parent / "t2i")]

    def run(*argv: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*t2i, *argv], env={**env, **extra}, capture_output=True,
                              text=True, timeout=180)

    submitted = run("submit", "an http heron", "--steps", "2", "--width", "64", "--height",
                    "64", "--wait")
    assert submitted.returncode == 0, submitted.stderr
    assert "succeeded" in submitted.stdout and "succeeded, full" in submitted.stderr
    job_id = submitted.stdout.split()[1]
    assert json.loads(run("status", job_id).stdout)["state"] == "succeeded"
    saved = run("result", job_id, "-o", str(tmp_path / "heron.png"))
    assert saved.returncode == 0 and (tmp_path / "heron.png").read_bytes()[:4] == b"\x89PNG"
    refused = run("status", job_id, T2I_API_KEY="not-a-key")
    assert refused.returncode == 2 and "API key" in refused.stderr


def test_openai_style_images_endpoint_answers_as_openai_clients_expect(api, stack) -> None:
    """POST /v1/images/generations: each image a job of ours, answered when all finish."""
    import base64
    import io

    from PIL import Image

    asked = {"prompt": "an openai-style otter", "n": 2, "size": "64x64", "model": "any"}
    answer = api.post("/v1/images/generations", json={**asked, "response_format": "b64_json"},
                      timeout=120)
    assert answer.status_code == 200, answer.text
    assert isinstance(answer.json()["created"], int) and len(answer.json()["data"]) == 2
    sizes = {Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).size
             for item in answer.json()["data"]}
    assert sizes == {(64, 64)}
    urls = api.post("/v1/images/generations", json={**asked, "n": 1}, timeout=120).json()
    assert httpx.get(urls["data"][0]["url"]).content[:4] == b"\x89PNG"
    before = job_count(stack)
    for bad, field in (({"size": "big"}, "size"), ({"n": 9}, "n"), ({"style": "vivid"}, "style"),
                       ({"response_format": "png"}, "response_format")):
        refused = api.post("/v1/images/generations", json={"prompt": "x", **bad})
        assert refused.status_code == 422 and refused.json()["error"]["field"] == field
    assert job_count(stack) == before


def test_a_tenant_lists_its_own_jobs_newest_first_a_page_at_a_time(api) -> None:
    ids = [api.post("/v1/jobs", json={"prompt": f"a listed fox {i}", "steps": 2}).json()["id"]
           for i in range(3)]
    first = api.get("/v1/jobs", params={"limit": 2}).json()
    assert [job["id"] for job in first["jobs"]] == ids[::-1][:2] and first["next"] is not None
    assert first["jobs"][0]["urls"]["get"] == f"/v1/jobs/{ids[2]}"
    rest = api.get("/v1/jobs", params={"limit": 2, "before": first["next"]}).json()
    assert rest["jobs"][0]["id"] == ids[0]
    with httpx.Client(base_url=api.base_url, timeout=30,
                      headers={"Authorization": f"Bearer {OTHER_KEY}"}) as other:
        theirs = other.get("/v1/jobs", params={"limit": 100}).json()["jobs"]
    assert not set(ids) & {job["id"] for job in theirs}
    for params in ({"limit": 0}, {"limit": 101}, {"limit": "many"}, {"before": "yesterday"}):
        refused = api.get("/v1/jobs", params=params)
        assert refused.status_code == 422 and refused.json()["error"]["field"] in params


def test_prefer_wait_answers_the_finished_job_or_202_and_a_bad_one_enqueues_nothing(
        api, stack) -> None:
    done = api.post("/v1/jobs", json={"prompt": "a patient crane", "steps": 2},
                    headers={"Prefer": "wait=60"})
    assert done.status_code == 200 and done.headers["preference-applied"] == "wait=60"
    assert done.json()["state"] == "succeeded" and "X-Amz-Signature" in done.json()["image_url"]
    quick = api.post("/v1/jobs", json={"prompt": "an impatient crane", "steps": 30},
                     headers={"Prefer": "respond-async, wait=0.01"})
    assert quick.status_code == 202 and set(quick.json()) == {"id", "state", "urls"}
    before = job_count(stack)
    for prefer in ("wait=600", "wait=soon"):
        bad = api.post("/v1/jobs", json={"prompt": "x"}, headers={"Prefer": prefer})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "Prefer", bad.text
    assert job_count(stack) == before


def test_async_client_streams_progress_then_the_result(stack) -> None:
    async def scenario() -> tuple[list[tuple[str, dict]], bytes, str]:
        url = f"http://{stack.api_host}:{stack.api_port}"
        async with AsyncClient(url, TENANT_KEY) as t2i:
            job_id = await t2i.submit("an async kingfisher", steps=6, width=64, height=64,
                                      idempotency_key="async-1")
            assert await t2i.submit("an async kingfisher", steps=6, width=64, height=64,
                                    idempotency_key="async-1") == job_id
            with pytest.raises(IdempotencyConflict):
                await t2i.submit("another bird", idempotency_key="async-1")
            with pytest.raises(InvalidRequest) as caught:
                await t2i.submit("x", steps=0)
            assert caught.value.field == "steps"
            events = [item async for item in t2i.events(job_id)]
            png = await t2i.result(job_id)
            return events, png, (await t2i.wait(job_id))["state"]

    events, png, state = asyncio.run(scenario())
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "finished" and set(kinds[:-1]) == {"progress"}
    assert events[-1][1]["state"] == "succeeded" and state == "succeeded"
    steps = [job["progress"]["step"] for kind, job in events if job["state"] == "generating"]
    assert steps == sorted(steps)
    assert png.startswith(b"\x89PNG")


def read_events(api: httpx.Client, path: str, **headers: str) -> list[dict[str, str]]:
    """A whole server-sent event stream, as one dict (id, event, data, retry) per event."""
    events, current = [], {}
    with api.stream("GET", path, headers=headers, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line:
                if current:
                    events.append(current)
                current = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(": ")
                current[field] = value
    return events


def test_event_stream_pushes_every_step_in_order_and_resumes_after_the_last_id(api) -> None:
    """Pushed from the job's event stream, not sampled: every one of 12 steps arrives, in
    order, each event with an id; a client that reconnects with Last-Event-ID gets exactly
    what followed."""
    job_id = api.post("/v1/jobs", json={"prompt": "a streamed heron", "steps": 12, "width": 64,
                                        "height": 64}).json()["id"]
    events = read_events(api, f"/v1/jobs/{job_id}/events")
    assert events[0] == {"retry": "2000"}
    pushed = events[1:]
    assert [e["event"] for e in pushed][-1] == "finished" and all("id" in e for e in pushed)
    assert json.loads(pushed[-1]["data"])["state"] == "succeeded"
    views = [json.loads(e["data"]) for e in pushed[:-1]]
    steps = [v["progress"]["step"] for v in views if v["state"] == "generating"]
    assert [step for step in steps if step > 0] == list(range(1, 13))
    assert [v["state"] for v in views][0] in ("queued", "triage")
    resumed = read_events(api, f"/v1/jobs/{job_id}/events", **{"Last-Event-ID": pushed[4]["id"]})
    assert [(e["id"], e["event"]) for e in resumed[1:]] == \
        [(e["id"], e["event"]) for e in pushed[5:]]


def test_openapi_document_describes_the_api(api: httpx.Client) -> None:
    document = httpx.get(api.base_url.join("/openapi.json")).json()  # served without a key
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    expected = {("/v1/jobs", "post"), ("/v1/jobs/{job_id}", "get"), ("/v1/jobs/{job_id}", "delete"),
                ("/v1/jobs/{job_id}/image", "get"), ("/v1/jobs/{job_id}/events", "get"),
                ("/v1/webhook-secret", "get"), ("/metrics", "get"), ("/healthz", "get")}
    assert expected <= {(path, method) for path, ops in paths.items() for method in ops}
    body = paths["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == set(SUBMISSION_FIELDS)
    events = body["properties"]["webhook_events_filter"]["anyOf"][0]["items"]["enum"]
    assert set(events) == {"started", "progress", "completed"}
    assert body["required"] == ["prompt"]
    schemes = document["components"]["securitySchemes"]
    for path, method in expected:
        if path.startswith("/v1/"):
            assert {next(iter(s)) for s in paths[path][method]["security"]} == set(schemes)
    assert "wait" in {p["name"] for p in paths["/v1/jobs/{job_id}"]["get"]["parameters"]}
    # a typed contract: every route documents its answer and its errors, in one error shape
    schemas = document["components"]["schemas"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            responses = operation["responses"]
            ok = [status for status in responses if status.startswith("2")]
            assert ok and all(responses[status].get("content") for status in ok), (path, method)
            shape = "Health" if path in ("/readyz", "/healthz") else "ErrorBody"
            for status, answer in responses.items():
                if status.startswith(("4", "5")):
                    ref = answer["content"]["application/json"]["schema"]["$ref"]
                    assert ref.rsplit("/", 1)[1] == shape, (path, method, status)
            if path.startswith("/v1/"):
                assert "401" in responses, (path, method)
    # and the answers are what the document says
    accepted = api.post("/v1/jobs", json={"prompt": "a documented owl", "steps": 2})
    assert set(accepted.json()) == set(schemas["Accepted"]["properties"])
    view = api.get(f"/v1/jobs/{accepted.json()['id']}", params={"wait": 60}).json()
    assert set(schemas["JobView"]["required"]) <= set(view) <= set(schemas["JobView"]["properties"])
    missing = api.get("/v1/jobs/no-such-job").json()
    assert set(missing) == {"error"} and set(missing["error"]) <= set(schemas["ErrorDetail"]
                                                                       ["properties"])


class Receiver(http.server.BaseHTTPRequestHandler):
    """A web backend's webhook endpoint that fails its first ``failures`` POSTs."""

    failures = 2
    received: list[tuple[int, dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        body = self.rfile.read(int(self.headers["Content-Length"]))
        status = 500 if len(self.received) < self.failures else 204
        self.received.append((status, dict(self.headers), body))
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def receiver() -> Iterator[str]:
    """On the one loopback port the stack's T2I_WEBHOOK_ALLOW opens."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", WEBHOOK_PORT), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{WEBHOOK_PORT}/hook"
    server.shutdown()
    server.server_close()


def test_webhook_is_signed_and_retried_until_delivered(api: httpx.Client, receiver: str,
                                                        stack) -> None:
    """No beat runs here: the finished job sends its delivery message, and each failed
    attempt schedules the next one itself."""
    count = job_count(stack)
    refused = api.post("/v1/jobs", json={"prompt": "x", "webhook_url": "ftp://example.com"})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "webhook_url"
    assert job_count(stack) == count
    job_id = api.post("/v1/jobs", json={"prompt": "a hooked trout", **SMALL,
                                        "webhook_url": receiver}).json()["id"]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        view = api.get(f"/v1/jobs/{job_id}").json()
        if (view.get("webhook") or {}).get("status") == "delivered":
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"webhook not delivered: {view.get('webhook')}, got {Receiver.received}")
    assert [status for status, _, _ in Receiver.received] == [500, 500, 204]
    secret = api.get("/v1/webhook-secret").json()["secret"]
    for _, headers, body in Receiver.received:
        # The same on every retry: receivers dedupe on it.
        assert headers[ID_HEADER] == f"{job_id}.completed"
        assert verify(secret, headers, body, now=time.time())
        assert json.loads(body)["job"]["state"] == "succeeded"
    first, last = (float(h[TIMESTAMP_HEADER]) for _, h, _ in
                   (Receiver.received[0], Receiver.received[-1]))
    assert last - first >= 2  # backed off 1 s, then 2 s
    assert view["webhook"] == {"status": "delivered", "attempts": 3, "outcome": "delivered",
                               "http_status": 204}


def test_a_webhook_gets_the_events_its_filter_names(api: httpx.Client, receiver: str,
                                                    monkeypatch) -> None:
    monkeypatch.setattr(Receiver, "failures", 0)
    bad = api.post("/v1/jobs", json={"prompt": "x", "webhook_url": receiver,
                                     "webhook_events_filter": ["finished"]})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "webhook_events_filter"
    job_id = api.post("/v1/jobs", json={
        "prompt": "a trout that reports", **SMALL, "steps": 30, "webhook_url": receiver,
        "webhook_events_filter": ["started", "progress", "completed"]}).json()["id"]
    assert api.get(f"/v1/jobs/{job_id}").json()["webhook_events_filter"] == [
        "started", "progress", "completed"]

    def events() -> list[tuple[str, dict]]:
        found = []
        for _, headers, body in list(Receiver.received):
            sent = json.loads(body)
            if sent["job"]["id"] == job_id:
                found.append((headers[ID_HEADER], sent))
        return found

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not any(
            sent["event"] == "job.completed" for _, sent in events()):
        time.sleep(0.2)
    kinds = [sent["event"] for _, sent in events()]
    assert kinds.count("job.started") == 1 and kinds.count("job.completed") == 1, kinds
    for message, sent in events():
        if sent["event"] == "job.progress":  # the job as it was when the POST was made
            assert sent["job"]["state"] == "generating"
            assert message == f"{job_id}.progress.{sent['job']['progress']['step']}"
        if sent["event"] == "job.completed":
            assert sent["job"]["state"] == "succeeded" and message == f"{job_id}.completed"

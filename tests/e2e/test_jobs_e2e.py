"""End to end: real Redis, S3, Celery triage and GPU worker processes (tiny test model on
CPU) and the HTTP API under uvicorn."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from conftest import TENANT, job_count
from core.errors import InvalidRequest
from core.jobs import image_key
from core.jobstore import connect
from core.objectstore import ObjectStore
from producer.client import Client

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def client(stack) -> Client:
    return Client(stack, tenant=TENANT)


def wait_for(predicate, timeout: float = 120.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not met in time")


def decode_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_client_submit_poll_and_fetch_image(client: Client, stack):
    job_id = client.submit("a red fox in the snow", width=64, height=96, steps=8, seed=3)
    view = client.wait(job_id, timeout=180)
    assert view["state"] == "succeeded", view
    assert view["cache"]["route"] == "full" and view["cache"]["reason"] == "miss"
    assert view["progress"] == {"step": 8, "total": 8}
    assert "TEST model" in view["model"]
    t = view["timings"]
    assert (t["submitted_at"] <= t["triage_started_at"] <= t["triage_finished_at"]
            <= t["generation_started_at"] <= t["generation_finished_at"] == t["finished_at"])
    assert client.jobs.get(job_id).image_key == image_key(job_id)  # not public: an object key
    image = decode_png(client.result(job_id))
    assert image.format == "PNG" and image.size == (64, 96)
    assert "X-Amz-Signature" in view["image_url"]
    assert decode_png(httpx.get(view["image_url"]).content).size == (64, 96)
    # job tasks store no Celery result (the job record is the answer; nothing reads them)
    results = connect(stack.results)
    stored = [results.get(key) for key in results.scan_iter("celery-task-meta-*")]
    assert not [value for value in stored if value and job_id in value]


def test_http_api_submit_poll_and_image(api: httpx.Client):
    response = api.post("/v1/jobs", json={"prompt": "a blue bicycle", "width": 72, "height": 64,
                                          "steps": 6})
    assert response.status_code == 202, response.text
    job_id, urls = response.json()["id"], response.json()["urls"]
    assert urls == {"get": f"/v1/jobs/{job_id}", "cancel": f"/v1/jobs/{job_id}",
                    "stream": f"/v1/jobs/{job_id}/events", "image": f"/v1/jobs/{job_id}/image"}
    assert "image_url" not in response.json()  # only ever the presigned URL of a finished job
    view = wait_for(lambda: (v := api.get(urls["get"]).json())["state"]
                    in ("succeeded", "failed") and v)
    assert view["state"] == "succeeded" and view["urls"] == urls, view
    assert "X-Amz-Signature" in view["image_url"]
    image = api.get(urls["image"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert decode_png(image.content).size == (72, 64)


def test_healthz_reports_redis_and_s3(api: httpx.Client):
    response = api.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"ok": True, "checks": {"redis": "ok", "s3": "ok"}}


def test_cancel_during_generation_stops_at_next_step(client: Client, stack):
    job_id = client.submit("a very long generation", steps=150, width=128, height=128)
    wait_for(lambda: client.status(job_id)["progress"]["step"] >= 2)
    client.cancel(job_id)
    view = client.wait(job_id, timeout=60)
    assert view["state"] == "cancelled"
    assert view["progress"]["step"] < 150
    assert not ObjectStore.from_settings(stack).exists(image_key(job_id))


def test_cancel_queued_job_never_generates(client: Client, api: httpx.Client):
    busy = client.submit("keeps the GPU worker busy", steps=150, width=128, height=128)
    waiting = client.submit("waits behind it", steps=5)
    response = api.delete(f"/v1/jobs/{waiting}")
    assert response.status_code == 200 and response.json()["cancel_requested"]
    client.cancel(busy)
    assert client.wait(waiting, timeout=60)["state"] == "cancelled"
    assert client.wait(busy, timeout=60)["state"] == "cancelled"
    assert client.status(waiting)["timings"]["generation_started_at"] is None


@pytest.mark.parametrize("body, status, field", [
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": "x", "steps": -1}, 422, "steps"),
    ({"prompt": "x", "width": 100}, 422, "width"),
    ({"prompt": "x", "style": "oil"}, 422, "style"),
    ({"steps": 5}, 422, "prompt"),
    (["prompt"], 422, "body"),
])
def test_http_api_refuses_invalid_requests_and_enqueues_nothing(api, stack, body, status, field):
    before = job_count(stack)
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == status
    assert response.json()["error"]["field"] == field
    assert job_count(stack) == before


def test_http_api_refuses_bad_transport(api: httpx.Client, stack):
    before = job_count(stack)
    assert api.post("/v1/jobs", content=b'{"prompt": "x"}',
                    headers={"content-type": "text/plain"}).status_code == 415
    assert api.post("/v1/jobs", content=b"{not json",
                    headers={"content-type": "application/json"}).status_code == 400
    big = b'{"prompt": "' + b"x" * 70_000 + b'"}'
    assert api.post("/v1/jobs", content=big,
                    headers={"content-type": "application/json"}).status_code == 413
    assert job_count(stack) == before
    assert api.get("/v1/jobs/does-not-exist").status_code == 404


def test_client_refuses_invalid_request_and_enqueues_nothing(client: Client, stack):
    before = job_count(stack)
    with pytest.raises(InvalidRequest, match="steps: 999 is out of range"):
        client.submit("x", steps=999)
    assert job_count(stack) == before


def test_workers_touch_their_liveness_file_without_asking_the_broker(stack) -> None:
    """What the Kubernetes liveness probes read (T2I_WORKER_ALIVE_FILE): fresh while the
    workers run."""
    alive = Path(stack.worker_alive_file)
    assert alive.exists() and time.time() - os.path.getmtime(alive) < 30

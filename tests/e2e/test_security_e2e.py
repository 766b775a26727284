"""API keys, tenant isolation of jobs and of the cache, expiring image URLs: real API,
workers, Redis, S3 and Chroma."""

from __future__ import annotations

import time

import httpx
import pytest

from conftest import OTHER_KEY, TENANT_KEY, finished, job_count
from core.jobstore import JobStore
from core.objectstore import ObjectStore

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def base_url(stack) -> str:
    return f"http://{stack.api_host}:{stack.api_port}"


def as_tenant(base_url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, timeout=30, headers={"X-API-Key": key})


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "not-a-key-of-anyone-at-all"},
                                     {"Authorization": f"Basic {TENANT_KEY}"}])
def test_requests_without_a_valid_key_are_refused_and_enqueue_nothing(stack, base_url, headers):
    before = job_count(stack)
    response = httpx.post(f"{base_url}/v1/jobs", json={"prompt": "a cat"}, headers=headers)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "unauthorized"
    assert httpx.get(f"{base_url}/v1/jobs/anything", headers=headers).status_code == 401
    assert job_count(stack) == before
    assert httpx.get(f"{base_url}/healthz").status_code == 200  # probes need no key


def test_a_tenant_sees_and_cancels_only_its_own_jobs(base_url):
    with as_tenant(base_url, TENANT_KEY) as acme, as_tenant(base_url, OTHER_KEY) as globex:
        job_id = acme.post("/v1/jobs", json={"prompt": "a private sketch", "steps": 3}).json()["id"]
        for call in (globex.get, globex.delete):
            response = call(f"/v1/jobs/{job_id}")
            assert response.status_code == 404 and job_id in response.text
        assert globex.get(f"/v1/jobs/{job_id}/image").status_code == 404
        view = finished(acme, job_id)
        assert view["state"] == "succeeded" and view["tenant"] == "acme"
        assert acme.get(f"/v1/jobs/{job_id}/image").status_code == 200
        bearer = {"Authorization": f"Bearer {TENANT_KEY}"}
        assert httpx.get(f"{base_url}/v1/jobs/{job_id}", headers=bearer).status_code == 200


def test_tenants_never_reuse_each_others_latents(stack, base_url):
    prompt = {"prompt": "a watercolor of a heron in reeds", "steps": 10, "seed": 2}
    with as_tenant(base_url, TENANT_KEY) as acme, as_tenant(base_url, OTHER_KEY) as globex:
        first = finished(acme, acme.post("/v1/jobs", json=prompt).json()["id"])
        exact = finished(acme, acme.post("/v1/jobs", json=prompt).json()["id"])
        assert exact["cache"]["reason"] == "exact repeat"
        variant = {**prompt, "negative_prompt": "blurry"}  # not identical: it resumes
        acme_jobs, deadline = {first["id"]}, time.monotonic() + 60
        while True:  # entries are registered asynchronously, on the cache queue
            again = finished(acme, acme.post("/v1/jobs", json=variant).json()["id"])
            acme_jobs.add(again["id"])
            if again["cache"]["reason"] == "hit" or time.monotonic() > deadline:
                break
        jobs = JobStore.from_settings(stack)  # entries and partitions are not public
        assert again["cache"]["reason"] == "hit" and jobs.get(again["id"]).plan.entry in acme_jobs
        # Identical to acme's request: neither its image nor its latents.
        other = finished(globex, globex.post("/v1/jobs", json=prompt).json()["id"])
        assert other["cache"]["reason"] == "miss"
        assert jobs.get(other["id"]).plan.partition != jobs.get(first["id"]).plan.partition


def test_presigned_image_urls_expire(stack):
    objects = ObjectStore.from_settings(stack)
    objects.ensure_bucket()
    objects.put("images/expiry-test.png", b"png bytes", content_type="image/png")
    url = objects.presigned_url("images/expiry-test.png", ttl_s=5)
    signed_at = time.monotonic()
    response = httpx.get(url)
    if time.monotonic() - signed_at < 4:  # a loaded machine may take longer than the TTL
        assert response.content == b"png bytes"
    time.sleep(max(0.0, 6.5 - (time.monotonic() - signed_at)))
    assert httpx.get(url).status_code == 403

"""A GPU worker with the step cache (T2I_STEP_CACHE=deepcache:3, batching on): its jobs,
full and resumed, run shallow steps; the record says so; the latents it caches say which step
cache made them, and stay in a partition of their own. Real Redis, S3, Chroma and Celery
workers, the tiny model."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from cachemgr.catalog import Catalog
from cachemgr.keys import request_partition
from conftest import private_workers
from core.jobstore import connect
from core.settings import Settings
from core.stepcache import StepCache
from producer.client import Client

pytestmark = pytest.mark.e2e

STEPS, SEED = 10, 4


@pytest.fixture(scope="module")
def step_cached(s3_server: Settings, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Settings]:
    with private_workers(s3_server, tmp_path_factory.mktemp("step-cache"), "stepcache",
                         gpu_batch=2, step_cache="deepcache:3") as config:
        yield config


def test_step_cached_jobs_run_shallow_steps_and_their_latents_say_so(step_cached):
    client, cache = Client(step_cached), StepCache(3)
    first = client.wait(client.submit("a lighthouse on a cliff", steps=STEPS, seed=SEED), 180)
    assert first["state"] == "succeeded", first
    assert first["step_cache"] == "deepcache:3"
    assert (first["unet_calls"], first["shallow_unet_calls"]) == (STEPS, STEPS - 4)
    catalog, deadline = Catalog(connect(step_cached.redis_url)), time.monotonic() + 60
    while (entry := catalog.entry(first["id"])) is None:  # registered on the cache queue
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert entry.lineage.step_cache == "deepcache:3"

    second = client.wait(client.submit("a lighthouse on a cliff at dusk", steps=STEPS,
                                       seed=SEED), 180)
    assert second["state"] == "succeeded" and second["cache"]["route"] == "resume", second
    k = second["cache"]["k"]
    assert second["unet_calls"] == STEPS - k
    assert second["shallow_unet_calls"] == STEPS - k - cache.full_steps(k, STEPS) > 0
    record = client.jobs.get(second["id"])
    shared = step_cached.cache_scope == "shared"

    def partition(step_cache: str) -> str:
        return request_partition(step_cached.model, step_cached.scheduler, step_cache,
                                 record.request, record.tenant, shared)

    assert record.plan is not None and record.plan.partition == partition("deepcache:3")
    assert catalog.item(first["id"], second["cache"]["k"]).partition == record.plan.partition
    assert partition("deepcache:3") != partition("off")

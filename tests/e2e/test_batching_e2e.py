"""A batching GPU worker (T2I_GPU_BATCH=4: a Celery pool of 4 task threads, one batcher
thread): concurrent jobs, full and resumed, share UNet calls and all succeed with their own
pictures. (That a batched job's image is the one it gets alone is tested on the engine, in
tests/engine/test_batching.py.) Real Redis, S3, Chroma and Celery workers, the tiny model."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from cachemgr.catalog import Catalog
from conftest import private_workers
from core.jobstore import connect
from core.settings import Settings
from producer.client import Client

pytestmark = pytest.mark.e2e

STEPS = 25


@pytest.fixture(scope="module")
def batching(s3_server: Settings, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Settings]:
    with private_workers(s3_server, tmp_path_factory.mktemp("batching"), "batching",
                         gpu_batch=4) as config:
        yield config


def pixels(client: Client, job_id: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(client.result(job_id))), dtype=np.int16)


def test_concurrent_jobs_share_unet_calls_and_each_gets_its_own_picture(batching):
    client = Client(batching)
    first = client.wait(client.submit("a lighthouse on a cliff", steps=STEPS, seed=1), 180)
    assert first["state"] == "succeeded" and first["batch_peak"] == 1   # alone on the worker
    catalog, deadline = Catalog(connect(batching.redis_url)), time.monotonic() + 60
    while not catalog.stored_ks(first["id"]):   # registered after the job, on the cache queue
        assert time.monotonic() < deadline
        time.sleep(0.05)
    prompts = ["a lighthouse on a cliff", "a red barn in a field", "a blue boat on a lake",
               "a lighthouse on a cliff"]
    ids = [client.submit(prompt, steps=STEPS, seed=seed)
           for seed, prompt in enumerate(prompts, start=2)]
    views = [client.wait(job_id, 180) for job_id in ids]
    assert all(view["state"] == "succeeded" for view in views), views
    assert max(view["batch_peak"] for view in views) >= 2, views
    assert [view["cache"]["route"] for view in views].count("resume") >= 1, views
    images = [pixels(client, view["id"]) for view in [first, *views]]
    assert all(np.abs(a - b).mean() > 1.0 for i, a in enumerate(images) for b in images[i + 1:])

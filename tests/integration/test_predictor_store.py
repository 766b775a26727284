"""Predictor samples and models through real Redis and S3; triage-side reloading."""

from __future__ import annotations

import numpy as np
import pytest

from cachemgr.predictor_store import (
    SAMPLES,
    VERSION,
    PredictorStore,
    ReloadingPredictor,
    train_and_publish,
)
from core.jobstore import connect
from core.objectstore import ObjectStore


@pytest.fixture()
def store(redis_url, s3_server) -> PredictorStore:
    client = connect(redis_url)
    client.delete(SAMPLES, VERSION)
    objects = ObjectStore.from_settings(s3_server)
    objects.ensure_bucket()
    return PredictorStore(client, objects, max_samples=300)


def test_samples_are_capped_to_the_most_recent(store: PredictorStore):
    for index in range(310):
        store.add_sample(np.full(8, index, dtype=np.float32))
    samples = store.samples()
    assert samples.shape == (300, 8) and samples[0][0] == 309 and samples[-1][0] == 10


def test_train_publish_and_reload(store: PredictorStore):
    now = [0.0]
    reloading = ReloadingPredictor(store, check_interval_s=10.0, clock=lambda: now[0])
    rng = np.random.default_rng(1)
    centre = rng.normal(size=16)
    far = -centre / np.linalg.norm(centre)
    assert reloading.should_look_up(far) and reloading.version == "untrained"

    assert train_and_publish(store, "v1", nu=0.1, min_samples=50) == {
        "trained": False, "samples": 0, "min_samples": 50}
    for _ in range(120):
        vector = centre + 0.1 * rng.normal(size=16)
        store.add_sample(vector / np.linalg.norm(vector))
    report = train_and_publish(store, "v1", nu=0.1, min_samples=50)
    assert report["trained"] and report["samples"] == 120 and store.latest_version() == "v1"

    now[0] = 5.0  # within the check interval: still the old answer
    assert reloading.should_look_up(far) and reloading.version == "untrained"
    now[0] = 11.0
    assert not reloading.should_look_up(far) and reloading.version == "v1"
    assert reloading.should_look_up(centre / np.linalg.norm(centre))


def test_reload_keeps_the_current_model_when_the_store_fails(store: PredictorStore, redis_url):
    connect(redis_url).set(VERSION, "missing-version")  # points at no object
    reloading = ReloadingPredictor(store, check_interval_s=0.0, clock=lambda: 1.0)
    assert reloading.should_look_up(np.ones(16)) and reloading.version == "untrained"

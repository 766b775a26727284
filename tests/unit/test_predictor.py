"""The one-class SVM match predictor and how triage honours it (pure; fakes for the stores)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.svm import OneClassSVM

from cachemgr.identical import InMemoryIdenticalRequests
from cachemgr.ktable import REFERENCE_TABLE
from cachemgr.predictor import AlwaysLookUp, SvmPredictor, consult, train_predictor
from cachemgr.routing import CachedEntry
from core.jobs import JobRecord, JobRequest, JobState
from core.jobstore import InMemoryJobStore
from core.objectstore import InMemoryObjectStore
from core.plan import Lineage, Reason
from workers.app import FULL_TASK, RESUME_TASK
from workers.triage import CacheRouter

DIM = 32
rng = np.random.default_rng(7)


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


CENTRES = unit_rows(rng.normal(size=(3, DIM)))


def cluster(centre: np.ndarray, count: int, spread: float = 0.15) -> np.ndarray:
    return unit_rows(centre + spread * rng.normal(size=(count, DIM)))


@pytest.fixture(scope="module")
def trained() -> SvmPredictor:
    samples = np.vstack([cluster(c, 150) for c in CENTRES])
    model = train_predictor(samples, version="v1", nu=0.05, min_samples=100)
    assert model is not None
    return model


def test_near_prompts_are_looked_up_and_far_ones_skipped(trained: SvmPredictor):
    near = np.vstack([cluster(c, 100) for c in CENTRES])
    far = unit_rows(rng.normal(size=(300, DIM)))
    near_rate = np.mean([trained.should_look_up(e) for e in near])
    far_rate = np.mean([trained.should_look_up(e) for e in far])
    # nu=0.05 leaves ~5% of the training prompts outside; new prompts of the same clusters
    # fall outside somewhat more often (0.85 inside when measured), far ones almost never in.
    assert near_rate >= 0.75 and far_rate <= 0.05, (near_rate, far_rate)


def test_decision_matches_scikit_learn(trained: SvmPredictor):
    probe = unit_rows(rng.normal(size=(20, DIM)))
    svm = OneClassSVM(kernel="rbf", nu=0.05, gamma=trained.gamma)
    svm.fit(np.vstack([cluster(c, 150) for c in CENTRES]))
    reference = dataclasses.replace(trained, support_vectors=svm.support_vectors_,
                                    dual_coef=svm.dual_coef_[0], intercept=float(svm.intercept_[0]))
    assert np.allclose(reference.decision(probe), svm.decision_function(probe), atol=1e-9)


def test_round_trip_through_bytes_without_pickle(trained: SvmPredictor):
    loaded = SvmPredictor.from_bytes(trained.to_bytes())
    probe = unit_rows(rng.normal(size=(5, DIM)))
    assert loaded.version == "v1" and loaded.samples == 450
    assert np.allclose(loaded.decision(probe), trained.decision(probe))


def test_too_few_samples_train_nothing():
    assert train_predictor(cluster(CENTRES[0], 10), "v", min_samples=50) is None


def test_audit_samples_predicted_misses_only(trained: SvmPredictor):
    far = unit_rows(rng.normal(size=(1, DIM)))[0]
    near = CENTRES[0]
    assert consult(trained, far, 0.1, draw=lambda: 0.05).audited
    skipped = consult(trained, far, 0.1, draw=lambda: 0.5)
    assert not skipped.look_up and not skipped.audited and not skipped.predicted_hit
    assert consult(trained, near, 0.1, draw=lambda: 0.0) == consult(trained, near, 0.0, lambda: 0.9)
    assert consult(AlwaysLookUp(), far, 0.0, lambda: 0.9).look_up


# ---- triage honours the predictor (fakes: no Chroma, Redis or model here) ----

class FakeEmbedder:
    name = "fake"

    def __init__(self, vector: np.ndarray) -> None:
        self.vector = vector

    def embed(self, texts):
        return np.array([self.vector])


class FakeIndex:
    def __init__(self, match):
        self.match, self.lookups = match, 0

    def nearest(self, embedding, partition, n):
        self.lookups += 1
        return [self.match]


class FakeCatalog:
    def entry(self, entry):
        return CachedEntry(frozenset({5, 10, 15, 20, 25}), Lineage.own(entry, "a cat", 50, 1))


class FixedPredictor:
    version = "fixed"

    def __init__(self, answer: bool) -> None:
        self.answer = answer

    def should_look_up(self, embedding):
        return self.answer


RECORD = JobRecord(id="j", state=JobState.TRIAGE, model="m", submitted_at=0.0,
                   request=JobRequest("a cat", "", 50, 7.5, 1, 512, 512))


def router(predictor, index, samples, draw=lambda: 0.99, audit=0.1) -> CacheRouter:
    jobs = InMemoryJobStore()
    jobs.create(RECORD)
    return CacheRouter(FakeEmbedder(CENTRES[0]), index, FakeCatalog(), InMemoryIdenticalRequests(),
                       InMemoryObjectStore(), jobs, REFERENCE_TABLE, predictor, "m", "ddim", False,
                       add_sample=samples.append, audit_fraction=audit, draw=draw)


def test_predicted_miss_skips_the_lookup():
    index, samples = FakeIndex(("e", 0.99)), []
    decision = router(FixedPredictor(False), index, samples)(RECORD)
    assert decision.task == FULL_TASK and decision.plan.reason == Reason.PREDICTED_MISS
    assert index.lookups == 0 and decision.plan.predicted_hit is False
    assert not decision.plan.looked_up and samples == []


def test_audited_predicted_miss_is_looked_up_and_recorded():
    index, samples = FakeIndex(("e", 0.99)), []
    decision = router(FixedPredictor(False), index, samples, draw=lambda: 0.01)(RECORD)
    assert index.lookups == 1 and decision.task == RESUME_TASK
    assert decision.plan.audited and decision.plan.looked_up
    assert len(samples) == 1  # a usable match is a training sample


def test_predicted_hit_looks_up_and_only_usable_matches_become_samples():
    samples: list = []
    hit = router(FixedPredictor(True), FakeIndex(("e", 0.99)), samples)(RECORD)
    assert hit.task == RESUME_TASK and hit.plan.k == 25 and len(samples) == 1
    far = router(FixedPredictor(True), FakeIndex(("e", 0.2)), samples)(RECORD)
    assert far.task == FULL_TASK and far.plan.looked_up and len(samples) == 1

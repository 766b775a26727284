"""Where the match predictor's training samples and models live: samples in a capped Redis
list, models as .npz objects in S3 with the current version in Redis. Triage workers pick up
a newer model by themselves (ReloadingPredictor)."""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable

import numpy as np
import redis

from cachemgr.predictor import AlwaysLookUp, MatchPredictor, SvmPredictor, train_predictor
from core.errors import T2IError
from core.jobstore import redis_errors
from core.objectstore import ObjectStore

log = logging.getLogger(__name__)

SAMPLES = "t2i:predictor:samples"
VERSION = "t2i:predictor:version"


def model_key(version: str) -> str:
    return f"predictor/ocsvm-{version}.npz"


class PredictorStore:
    def __init__(self, client: redis.Redis, objects: ObjectStore, max_samples: int = 5000) -> None:
        self._redis, self._objects, self._max_samples = client, objects, max_samples

    def add_sample(self, embedding: np.ndarray) -> None:
        encoded = base64.b64encode(np.asarray(embedding, dtype=np.float32).tobytes()).decode()
        with redis_errors():
            pipe = self._redis.pipeline()
            pipe.lpush(SAMPLES, encoded)
            pipe.ltrim(SAMPLES, 0, self._max_samples - 1)  # keep the most recent
            pipe.execute()

    def samples(self) -> np.ndarray:
        with redis_errors():
            raw = self._redis.lrange(SAMPLES, 0, -1)
        return np.array([np.frombuffer(base64.b64decode(item), dtype=np.float32) for item in raw])

    def publish(self, model: SvmPredictor) -> None:
        self._objects.put(model_key(model.version), model.to_bytes())
        with redis_errors():
            self._redis.set(VERSION, model.version)

    def latest_version(self) -> str | None:
        with redis_errors():
            return self._redis.get(VERSION)

    def load(self, version: str) -> SvmPredictor:
        return SvmPredictor.from_bytes(self._objects.get(model_key(version)))


class ReloadingPredictor:
    """The latest published model, checked for at most every ``check_interval_s``; answers
    "look up" until a model exists, and keeps the model it has if the stores fail."""

    def __init__(self, store: PredictorStore, check_interval_s: float,
                 clock: Callable[[], float]) -> None:
        self._store, self._interval, self._clock = store, check_interval_s, clock
        self._current: MatchPredictor = AlwaysLookUp()
        self._checked_at = float("-inf")

    @property
    def version(self) -> str:
        return self._current.version

    def _refresh(self) -> None:
        now = self._clock()
        if now - self._checked_at < self._interval:
            return
        self._checked_at = now
        try:
            latest = self._store.latest_version()
            if latest and latest != self._current.version:
                loaded = self._store.load(latest)
                self._current = loaded
                log.info("match predictor %s loaded (%d samples)", latest, loaded.samples)
        except T2IError as exc:
            log.warning("match predictor not refreshed: %s", exc)

    def should_look_up(self, embedding: np.ndarray) -> bool:
        self._refresh()
        return self._current.should_look_up(embedding)


def train_and_publish(store: PredictorStore, version: str, nu: float,
                      min_samples: int) -> dict[str, object]:
    samples = store.samples()
    model = train_predictor(samples, version, nu=nu, min_samples=min_samples)
    if model is None:
        return {"trained": False, "samples": len(samples), "min_samples": min_samples}
    store.publish(model)
    log.info("match predictor %s trained on %d samples (%d support vectors)", version,
             len(samples), len(model.support_vectors))
    return {"trained": True, "version": version, "samples": len(samples),
            "support_vectors": len(model.support_vectors)}

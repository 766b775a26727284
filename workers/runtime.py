"""Per-process singletons, created on first use in the worker child (after fork), so CUDA
and network clients are never shared across a fork."""

from __future__ import annotations

import functools
import time

from celeryconfig import Settings, load_settings
from core.jobstore import JobStore
from core.objectstore import ObjectStore


@functools.cache
def settings() -> Settings:
    return load_settings()


@functools.cache
def job_store() -> JobStore:
    return JobStore.from_settings(settings())


@functools.cache
def object_store() -> ObjectStore:
    store = ObjectStore.from_settings(settings())
    store.ensure_bucket()
    return store


@functools.cache
def engine():
    from workers.engine import Engine  # torch is imported by GPU workers only

    config = settings()
    return Engine.load(config.model, config.scheduler, config.device,
                       config.state_path / "models", config.hf_hub_offline)


clock = time.time

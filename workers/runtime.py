"""Per-process singletons, created on first use in the worker child (after fork), so CUDA
and network clients are never shared across a fork."""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable

from cachemgr.catalog import Catalog
from cachemgr.identical import IdenticalRequests
from cachemgr.ktable import KTable
from core.addons import targets_key
from core.errors import T2IError
from core.jobs import JobRequest
from core.jobstore import JobStore, MetricsStore, connect
from core.objectstore import ObjectStore
from core.settings import Settings, load_settings
from core.stepcache import StepCache
from workers.builtin_models import (
    cache_embedder,
    cache_k_table,
    cache_step_cache,
    served_controlnets,
)

log = logging.getLogger(__name__)
clock = time.time


@functools.cache
def settings() -> Settings:
    return load_settings()


@functools.cache
def redis_client():
    """One connection pool per process for job records, the catalog and predictor samples."""
    return connect(settings().redis_url)


@functools.cache
def broker_client():
    """The broker's Redis (the same as redis_client unless T2I_BROKER_URL says otherwise)."""
    return connect(settings().broker)


@functools.cache
def job_store() -> JobStore:
    from workers.app import WEBHOOK_TASK, app, enqueue

    return JobStore(redis_client(), settings().job_ttl_s,
                    webhook_due=functools.partial(enqueue, app, WEBHOOK_TASK),
                    outage_s=settings().redis_outage_s)


@functools.cache
def metrics() -> MetricsStore:
    return MetricsStore(redis_client())


@functools.cache
def catalog() -> Catalog:
    return Catalog(redis_client())


@functools.cache
def identical_requests() -> IdenticalRequests:
    return IdenticalRequests(redis_client(), settings().job_ttl_s)


@functools.cache
def object_store() -> ObjectStore:
    store = ObjectStore.from_settings(settings())
    store.ensure_bucket()
    return store


def embedder_name() -> str:
    return cache_embedder(settings().embedder, settings().model)


@functools.cache
def k_table() -> KTable:
    return KTable.load(cache_k_table(settings().k_table, settings().model, embedder_name()))


def step_cache() -> StepCache:
    return cache_step_cache(settings().step_cache, k_table())


def _limit_torch_threads() -> None:
    if settings().torch_threads:
        import torch

        torch.set_num_threads(settings().torch_threads)


_engine_lock = threading.Lock()


def engine():
    """The process's engine, loaded once even when task threads ask at the same time: a
    batching one (workers.batcher) when T2I_GPU_BATCH > 1."""
    with _engine_lock:
        return _load_engine()


def loaded_engine():
    """The engine if this process has loaded it, else None (never starts a load)."""
    return _load_engine() if _load_engine.cache_info().currsize else None


@functools.cache
def _load_engine():
    from workers.controlnet import ControlConfig
    from workers.engine import Engine  # torch is imported by GPU workers only
    from workers.lora import AdapterConfig

    config = settings()
    _limit_torch_threads()
    adapters = AdapterConfig(lambda key: object_store().get(key), config.lora_cache_mb * 2**20,
                             config.lora_from)
    controlnets = served_controlnets(config.controlnets, config.model)
    controls = ControlConfig(lambda key: object_store().get(key), controlnets,
                             config.controlnet_parallel) if controlnets else None
    loaded = Engine.load(config.model, config.scheduler, config.device,
                         config.state_path / "models", config.hf_hub_offline, step_cache(),
                         adapters, controls)
    _publish_lora_targets(loaded.lora.targets if loaded.lora else {})
    if config.gpu_batch == 1:
        return loaded
    from workers.batcher import BatchingEngine

    return BatchingEngine(loaded, config.gpu_batch)


def _publish_lora_targets(targets: dict[str, tuple[int, int]]) -> None:
    """The layers (and shapes) a LoRA may adapt on the served model, for the API's upload
    check (core.addons.targets_key)."""
    try:
        object_store().put(targets_key(settings().model),
                           json.dumps({name: list(shape) for name, shape in targets.items()},
                                      sort_keys=True).encode(), content_type="application/json")
    except T2IError as exc:
        log.warning("LoRA targets not published (uploads wait for a worker that can): %s", exc)


@functools.cache
def embedder():
    from workers.embedder import load_embedder

    config = settings()
    _limit_torch_threads()
    return load_embedder(embedder_name(), config.model, config.state_path / "models")


@functools.cache
def vectors():
    from cachemgr.vectors import VectorIndex

    return VectorIndex.from_settings(settings(), embedder().name)


@functools.cache
def predictor_store():
    from cachemgr.predictor_store import PredictorStore

    return PredictorStore(redis_client(), object_store(), settings().predictor_max_samples)


@functools.cache
def router():
    """Triage's route decision: the cache router, or full generation when the cache is off."""
    from cachemgr.predictor import AlwaysLookUp
    from cachemgr.predictor_store import ReloadingPredictor
    from workers.triage import CacheRouter, full_generation_only

    config = settings()
    if not config.cache_enabled:
        return full_generation_only
    predictor, training = AlwaysLookUp(), {}
    if config.predictor_enabled:
        predictor = ReloadingPredictor(predictor_store(), config.predictor_check_interval_s, clock)
        training = {"add_sample": predictor_store().add_sample,
                    "audit_fraction": config.predictor_audit_fraction}
    return CacheRouter(embedder(), vectors(), catalog(), identical_requests(), object_store(),
                       job_store(), k_table(), predictor, config.model, config.scheduler,
                       config.cache_scope == "shared", step_cache().spec, config.lora_from,
                       **training)


@functools.cache
def worker_preference() -> Callable[[JobRequest], str | None]:
    """Which GPU worker a job goes to directly (core.affinity): only LoRA jobs, unless
    T2I_LORA_AFFINITY=off, and only where GPU workers keep leases (the reconciler can send
    on what a dead one's own queue held only then)."""
    from core.affinity import preferred_worker
    from workers.reconcile import using_own_queue, worker_views

    config = settings()
    if config.lora_affinity == "off" or not config.worker_leases:
        return lambda request: None

    def prefer(request: JobRequest) -> str | None:
        if not request.loras:
            return None
        node = preferred_worker([lora.digest for lora in request.loras],
                                worker_views(broker_client()), config.lora_affinity)
        if node:
            using_own_queue(broker_client(), node)
        return node

    return prefer


def reliability():
    from workers.generation import Reliability

    config = settings()
    return Reliability(max_deliveries=config.max_deliveries, store_outage_s=config.store_outage_s)


@functools.cache
def cache_config():
    """What GPU workers need to write and read the cache; None when the cache is off."""
    from workers.app import REGISTER_TASK, TRIAGE_TASK, app, enqueue
    from workers.generation import CacheConfig

    config = settings()
    if not config.cache_enabled:
        return None

    def register(entry: str, partition: str, sizes: dict[int, int]) -> None:
        enqueue(app, REGISTER_TASK, entry, partition=partition, sizes=sizes)

    return CacheConfig(config.model, config.scheduler, config.cache_scope == "shared", k_table(),
                       catalog(), register, identical_requests(),
                       functools.partial(enqueue, app, TRIAGE_TASK), config.cache_admit_resumed,
                       step_cache().spec, config.lora_from)


@functools.cache
def evictor():
    from cachemgr.evictor import Evictor
    from cachemgr.policies import Budget, policy_by_name

    config = settings()
    return Evictor(catalog(), object_store(), vectors(),
                   policy_by_name(config.cache_policy, config.cache_decay_half_life_s),
                   Budget(config.cache_max_bytes, config.cache_max_items, config.cache_low_water),
                   config.cache_keep_recent_s)


@functools.cache
def webhook_delivery():
    from core.settings import require_secret
    from core.webhooks import AddressPolicy, parse_allowlist
    from workers.webhooks import Delivery, http_send, resolve_host

    config = settings()
    return Delivery(AddressPolicy(parse_allowlist(config.webhook_allow)), resolve_host,
                    http_send(config.webhook_timeout_s), require_secret(config, "webhook_secret"),
                    config.webhook_max_attempts, config.webhook_timeout_s)

"""LoRAs in the engine (the tiny pipeline, in process, CPU): a job's image is the one the
adapter merged into the weights gives, jobs with different adapters share a batch without
cross-talk, a missing adapter loads in the background while the first steps run, resident
adapters are bounded, and a lost adapter fails its job alone. The adapters are random (what
matters here is the arithmetic; quality.addons measures trained ones)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable

import numpy as np
import pytest
import torch

from bench.addons import random_lora
from core.addons import LoraRef, blob_key, check_lora_file
from core.errors import ObjectMissing
from core.jobs import JobRequest
from core.objectstore import InMemoryObjectStore
from core.stepcache import StepCache
from tests.engine.shared import no_op, pixels
from workers.builtin_models import build_tiny_pipeline
from workers.engine import Engine, Generation, Trajectory
from workers.lora import AdapterConfig, lora_targets, merged, parse_adapter

STEPS = 10


def lora_file(unet: torch.nn.Module, seed: int) -> bytes:
    return random_lora(lora_targets(unet), rank=4, seed=seed, std=0.3)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def request(*loras: LoraRef, seed: int = 5) -> JobRequest:
    return JobRequest(prompt="a red fox in the snow", negative_prompt="", steps=STEPS,
                      guidance=7.5, seed=seed, width=64, height=64, loras=loras)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline()


@pytest.fixture(scope="module")
def store(pipe) -> InMemoryObjectStore:
    objects = InMemoryObjectStore()
    for seed in (1, 2):
        data = lora_file(pipe.unet, seed)
        objects.put(blob_key(digest(data)), data)
    return objects


@pytest.fixture(scope="module")
def refs(store) -> list[LoraRef]:
    digests = sorted(key.split("/")[-1].removesuffix(".safetensors") for key in store.objects)
    return [LoraRef(f"style-{i}", 0.8, d) for i, d in enumerate(digests)]


def engine_with(pipe, fetch: Callable[[str], bytes], active_from: float = 0.0,
                budget: int = 2**30, step_cache: StepCache | None = None) -> Engine:
    config = AdapterConfig(fetch, budget, active_from)
    if step_cache is None:
        return Engine(pipe, "ddim", torch.device("cpu"), "tiny (test)", adapters=config)
    return Engine(pipe, "ddim", torch.device("cpu"), "tiny (test)", step_cache, config)


def offline(pipe, store, ref: LoraRef) -> Generation:
    """The job run with the adapter merged into the weights (diffusers' fuse_lora)."""
    adapter = parse_adapter(ref.digest, store.get(blob_key(ref.digest)), torch.device("cpu"),
                            torch.float32)
    plain = Engine(pipe, "ddim", torch.device("cpu"), "tiny (test)")
    with merged(pipe.unet, ((adapter, ref.scale),)):
        return plain.generate(request(), no_op)


def test_the_test_adapters_pass_the_upload_check(pipe, store, refs):
    for ref in refs:
        found = check_lora_file(store.get(blob_key(ref.digest)), lora_targets(pipe.unet),
                                max_bytes=2**20, max_rank=16)
        assert found.rank == 4 and len(found.modules) == len(lora_targets(pipe.unet))


def test_a_lora_job_makes_the_image_of_the_adapter_merged_offline(pipe, store, refs):
    engine = engine_with(pipe, store.get)
    base = engine.generate(request(), no_op)
    with_lora = engine.generate(request(refs[0]), no_op)
    reference = offline(pipe, store, refs[0])
    assert np.abs(pixels(with_lora) - pixels(base)).mean() > 5     # the adapter matters
    assert np.abs(pixels(with_lora) - pixels(reference)).max() <= 1
    assert engine.generate(request(), no_op).image_png == base.image_png  # weights untouched


def test_jobs_with_different_adapters_share_one_unet_call_without_cross_talk(pipe, store, refs):
    engine = engine_with(pipe, store.get)
    jobs = [request(refs[0]), request(refs[1]), request(), request(refs[1], refs[0])]
    alone = [engine.generate(job, no_op) for job in jobs]
    batch = [engine.begin(job, no_op) for job in jobs]
    while not batch[0].finished:
        assert engine.advance(batch) == {}
    for trajectory, single in zip(batch, alone):
        assert np.abs(pixels(engine.finish(trajectory)) - pixels(single)).max() <= 1
    assert len({single.image_png for single in alone}) == 4


def test_the_step_cache_keeps_each_row_with_its_adapter(pipe, store, refs):
    engine = engine_with(pipe, store.get, step_cache=StepCache(3))
    first = engine.begin(request(refs[0]), no_op)
    engine.advance([first])                       # one step ahead: the two differ in phase
    second = engine.begin(request(refs[1], seed=6), no_op)
    while not second.finished:
        engine.advance([t for t in (first, second) if not t.finished])
    for trajectory, job in ((first, request(refs[0])), (second, request(refs[1], seed=6))):
        alone = engine.generate(job, no_op)
        assert np.abs(pixels(engine.finish(trajectory)) - pixels(alone)).max() <= 1


class GatedStore:
    """The store's files, each held back until ``release`` (an adapter still in flight)."""

    def __init__(self, store: InMemoryObjectStore) -> None:
        self.store, self.gate, self.fetched = store, threading.Event(), threading.Event()

    def get(self, key: str) -> bytes:
        self.fetched.set()
        assert self.gate.wait(30)
        return self.store.get(key)


def test_a_missing_adapter_loads_while_the_first_steps_run(pipe, store, refs):
    resident = engine_with(pipe, store.get, active_from=0.5)
    expected = resident.generate(request(refs[0]), no_op)
    gated = GatedStore(store)
    engine = engine_with(pipe, gated.get, active_from=0.5)
    seen: list[int] = []

    def on_step(step: int, total: int) -> None:
        seen.append(step)
        if step == 3:       # steps 1..3 ran with the file still on its way
            assert gated.fetched.is_set() and not engine.adapters.resident()
            gated.gate.set()

    result = engine.generate(request(refs[0]), on_step)
    assert seen == list(range(1, STEPS + 1))
    assert result.image_png == expected.image_png     # the same schedule: base, then adapter
    assert engine.adapters.stats.cold == 1 and engine.adapters.resident() == [refs[0].digest]


def test_a_job_waits_for_its_adapter_from_the_set_step_on(pipe, store, refs):
    gated = GatedStore(store)
    engine = engine_with(pipe, gated.get, active_from=0.3)
    steps_before_release: list[int] = []

    def release_later() -> None:
        assert gated.fetched.wait(30)
        threading.Event().wait(0.5)
        gated.gate.set()

    threading.Thread(target=release_later, daemon=True).start()
    result = engine.generate(request(refs[0]), lambda step, total: steps_before_release.append(
        step) if not gated.gate.is_set() else None)
    assert steps_before_release == [1, 2, 3]     # step 4 (index 3) needs the adapter
    assert result.adapter_wait_s > 0.2


def test_resident_adapters_stay_within_their_budget_least_recently_used_out(pipe, store, refs):
    size = parse_adapter("x", store.get(blob_key(refs[0].digest)), torch.device("cpu"),
                         torch.float32).nbytes
    engine = engine_with(pipe, store.get, budget=size)     # room for one
    cache = engine.adapters
    cache.load(refs[0].digest).result()
    cache.load(refs[0].digest).result()
    cache.load(refs[1].digest).result()
    assert cache.resident() == [refs[1].digest]
    assert (cache.stats.cold, cache.stats.warm, cache.stats.evicted) == (2, 1, 1)


def test_a_lost_adapter_fails_its_job_alone(pipe, store, refs):
    engine = engine_with(pipe, store.get)
    lost = LoraRef("gone", 1.0, "0" * 64)
    batch: list[Trajectory] = [engine.begin(request(refs[0]), no_op),
                               engine.begin(request(lost), no_op)]
    stopped = engine.advance(batch)
    assert list(stopped) == [1] and isinstance(stopped[1], ObjectMissing)
    assert batch[0].done == 1 and batch[1].done == 0

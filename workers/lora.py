"""LoRAs served without patching the base weights: each adapted layer adds, per row of a
UNet call, ``scale * (x @ A.T) @ B.T`` of that row's adapters (a forward hook).

SwiftDiffusion's point (arXiv 2407.02031) is that merging an adapter into the weights
(diffusers' ``fuse_lora``) on the critical path stalls serving, and that one merged model
serves one adapter per batch. Here the base weights never change, so jobs with different
adapters (or none) share one UNet call, a switch costs nothing, and an adapter can arrive
while a job already runs: a job's first steps (``core.addons.active_from``) run without it
while ``AdapterCache`` fetches it in the background. (PEFT's multi-adapter layers in
diffusers set one adapter mix for the whole call; per-row mixes need this hook.)
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from core.addons import TARGET_SUFFIXES, blob_key

log = logging.getLogger(__name__)

Pair = tuple[torch.Tensor, torch.Tensor]   # (A: rank x in, B: out x rank)


@dataclass(eq=False)
class Adapter:
    """A loaded LoRA: its pairs by UNet module name, on the engine's device and dtype."""

    digest: str
    pairs: dict[str, Pair]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.pairs.values() for t in pair)


RowAdapters = tuple[tuple[Adapter, float], ...]
"""The adapters (and scales) one row of a UNet call runs with; () for the base model."""


def lora_targets(unet: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """{module: (out features, in features)} of the layers a LoRA may adapt: the attention
    projections (what a GPU worker publishes, core.addons.targets_key)."""
    return {name: (module.out_features, module.in_features)
            for name, module in unet.named_modules()
            if isinstance(module, torch.nn.Linear) and name.endswith(TARGET_SUFFIXES)
            and (".attn1." in name or ".attn2." in name)}


def parse_adapter(digest: str, data: bytes, device: torch.device,
                  dtype: torch.dtype) -> Adapter:
    """An uploaded file (checked on upload by core.addons.check_lora_file) as an Adapter."""
    tensors = load_safetensors(data)
    pairs = {}
    for name, a in tensors.items():
        if name.endswith(".lora_A.weight"):
            module = name.removeprefix("unet.").removesuffix(".lora_A.weight")
            b = tensors[f"unet.{module}.lora_B.weight"]
            pairs[module] = (a.to(device, dtype), b.to(device, dtype))
    return Adapter(digest, pairs)


def adapter_file(pairs: dict[str, Pair]) -> bytes:
    """Pairs by module as an upload (what ``parse_adapter`` reads): the tensor names
    diffusers' save_lora_weights writes."""
    tensors = {}
    for module, (a, b) in pairs.items():
        tensors[f"unet.{module}.lora_A.weight"] = a.detach().contiguous().clone()
        tensors[f"unet.{module}.lora_B.weight"] = b.detach().contiguous().clone()
    return save_safetensors(tensors)


class LoraLayer:
    """Hooks on every target layer of ``unet`` adding the current rows' adapters."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.targets = lora_targets(unet)
        self._groups: list[tuple[int, int, RowAdapters]] = []
        self._rows: list[RowAdapters] = []
        modules = dict(unet.named_modules())
        for name in self.targets:
            modules[name].register_forward_hook(partial(self._hook, name))

    @staticmethod
    def _runs(rows: list[RowAdapters]) -> list[tuple[int, int, RowAdapters]]:
        """Rows grouped into runs with the same adapters (rows of one job are adjacent)."""
        groups: list[tuple[int, int, RowAdapters]] = []
        for index, adapters in enumerate(rows):
            if groups and groups[-1][2] == adapters and groups[-1][1] == index:
                groups[-1] = (groups[-1][0], index + 1, adapters)
            elif adapters:
                groups.append((index, index + 1, adapters))
        return groups

    @contextlib.contextmanager
    def applied(self, rows: list[RowAdapters]) -> Iterator[None]:
        """For the UNet calls inside: row i runs with ``rows[i]``."""
        self._rows, self._groups = rows, self._runs(rows)
        try:
            yield
        finally:
            self._rows, self._groups = [], []

    @contextlib.contextmanager
    def narrowed(self, keep: torch.Tensor) -> Iterator[None]:
        """For calls on a subset of the rows (the step cache's deep part): the kept ones."""
        rows, groups = self._rows, self._groups
        with self.applied([r for r, kept in zip(rows, keep.tolist()) if kept]):
            yield
        self._rows, self._groups = rows, groups

    def _hook(self, name: str, _: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
              output: torch.Tensor) -> torch.Tensor | None:
        if not self._groups:
            return None
        if output.shape[0] != len(self._rows):
            raise RuntimeError(f"LoRA rows set for {len(self._rows)} rows, {name} ran "
                               f"{output.shape[0]}")
        x = inputs[0]
        out = output.clone() if torch.is_grad_enabled() else output
        for start, end, adapters in self._groups:
            for adapter, scale in adapters:
                if pair := adapter.pairs.get(name):
                    a, b = pair
                    out[start:end] += scale * ((x[start:end] @ a.T) @ b.T)
        return out


@contextlib.contextmanager
def merged(unet: torch.nn.Module, adapters: RowAdapters) -> Iterator[None]:
    """The adapters merged into the base weights for the block inside, then taken out: what
    loading and fusing an adapter per job does (diffusers' fuse_lora). The naive baseline
    of the add-on benchmark, and the offline reference the tests compare with."""
    modules = dict(unet.named_modules())
    deltas = [(modules[name].weight, scale * (b @ a)) for adapter, scale in adapters
              for name, (a, b) in adapter.pairs.items()]
    with torch.no_grad():
        for weight, delta in deltas:
            weight += delta.to(weight.dtype)
        try:
            yield
        finally:
            for weight, delta in deltas:
                weight -= delta.to(weight.dtype)


@dataclass
class CacheStats:
    cold: int = 0          # loads that fetched the file
    warm: int = 0          # requests served by a resident adapter
    evicted: int = 0
    load_s: list[float] = field(default_factory=list)


class AdapterCache:
    """Adapters resident on a GPU worker, least recently used out first beyond
    ``budget_bytes``; a missing one is fetched and parsed on a background thread, so the
    job that asked for it runs its first steps meanwhile. An evicted adapter stays alive
    for the jobs that hold it."""

    def __init__(self, fetch: Callable[[str], bytes], device: torch.device, dtype: torch.dtype,
                 budget_bytes: int, loaders: int = 2) -> None:
        self.fetch, self.device, self.dtype = fetch, device, dtype
        self.budget_bytes = budget_bytes
        self.stats = CacheStats()
        self._resident: OrderedDict[str, Adapter] = OrderedDict()
        self._loading: dict[str, Future[Adapter]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(loaders, thread_name_prefix="lora-load")

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._resident)

    def load(self, digest: str) -> Future[Adapter]:
        """The adapter with this digest: resident at once, else loading."""
        with self._lock:
            if adapter := self._resident.get(digest):
                self._resident.move_to_end(digest)
                self.stats.warm += 1
                done: Future[Adapter] = Future()
                done.set_result(adapter)
                return done
            if digest not in self._loading:
                self.stats.cold += 1
                self._loading[digest] = self._pool.submit(self._load, digest)
            return self._loading[digest]

    def _load(self, digest: str) -> Adapter:
        started = time.monotonic()
        try:
            adapter = parse_adapter(digest, self.fetch(blob_key(digest)), self.device, self.dtype)
        except BaseException:
            with self._lock:
                self._loading.pop(digest, None)
            raise
        with self._lock:
            self._loading.pop(digest, None)
            self._resident[digest] = adapter
            while len(self._resident) > 1 and \
                    sum(a.nbytes for a in self._resident.values()) > self.budget_bytes:
                gone, _ = self._resident.popitem(last=False)
                self.stats.evicted += 1
                log.info("adapter %s evicted (budget %d bytes)", gone[:12], self.budget_bytes)
            self.stats.load_s.append(time.monotonic() - started)
        return adapter

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def wait_for(loras: tuple[tuple[Future[Adapter], float], ...]) -> tuple[RowAdapters, float]:
    """The adapters, once loaded, and the seconds spent waiting for them."""
    started = time.monotonic()
    adapters = tuple((future.result(), scale) for future, scale in loras)
    return adapters, time.monotonic() - started


@dataclass(frozen=True)
class AdapterConfig:
    """How a GPU worker serves LoRAs: where files come from (an object key -> bytes), how
    many bytes of adapters stay resident, and from which fraction of a job's steps they
    must act (T2I_LORA_FROM)."""

    fetch: Callable[[str], bytes]
    budget_bytes: int
    active_from: float = 0.0

"""Cache partitions and object keys. Pure.

A latent is reusable only by a job that would have computed it the same way: same model,
scheduler, step cache, step count, image size, guidance scale and adapters (LoRA content and
scale), and (unless the cache is shared) by the same tenant. Those make the partition; a
lookup never leaves its partition, so a latent from another model, size, adapter or tenant
is never offered.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from core.addons import partition_spec

if TYPE_CHECKING:
    from core.jobs import JobRequest


SHARED_SCOPE = "shared"


def cache_scope(tenant: str, shared: bool) -> str:
    """Whose latents a job may reuse: its tenant's only, unless the operator shares the
    cache (a shared approximate cache lets one user's hits reveal another's prompts)."""
    return SHARED_SCOPE if shared else f"tenant:{tenant}"


def partition_key(model: str, scheduler: str, step_cache: str, steps: int, width: int,
                  height: int, guidance: float, scope: str, adapters: str = "") -> str:
    """``adapters``: core.addons.partition_spec of the request's LoRAs ("" for none)."""
    spec = f"{model}|{scheduler}|{step_cache}|n={steps}|{width}x{height}|g={guidance:g}|{scope}"
    if adapters:
        spec += f"|lora={adapters}"
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def request_partition(model: str, scheduler: str, step_cache: str, request: JobRequest,
                      tenant: str, shared: bool, lora_from: float = 0.0) -> str:
    """The partition a job's latents belong to (triage looks up, GPU workers write here);
    a LoRA job's also names T2I_LORA_FROM, which changes its latents."""
    return partition_key(model, scheduler, step_cache, request.steps, request.width,
                         request.height, request.guidance, cache_scope(tenant, shared),
                         partition_spec(request.loras, lora_from, request.controlnet))


def identical_key(partition: str, request: JobRequest) -> str:
    """Requests with the same digest would make the same image: same partition (model,
    scheduler, step cache, steps, size, guidance, tenant unless shared) and prompt, negative prompt
    and seed."""
    spec = f"{partition}|{request.prompt}|{request.negative_prompt}|{request.seed}"
    return hashlib.sha256(spec.encode()).hexdigest()[:32]


def latent_key(partition: str, entry: str, k: int) -> str:
    """Deterministic: a redelivered generation overwrites its latents, never duplicates them."""
    return f"cache/{partition}/{entry}/k{k:03d}.safetensors"


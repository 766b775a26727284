"""Cache partitions and object keys. Pure.

A latent is reusable only by a job that would have computed it the same way: same model,
scheduler, step count, image size and guidance scale. Those make the partition; a lookup
never leaves its partition, so a latent from another model or size is never offered.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.jobs import JobRequest


def partition_key(model: str, scheduler: str, steps: int, width: int, height: int,
                  guidance: float) -> str:
    spec = f"{model}|{scheduler}|n={steps}|{width}x{height}|g={guidance:g}"
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def request_partition(model: str, scheduler: str, request: JobRequest) -> str:
    """The partition a job's latents belong to (triage looks up, GPU workers write here)."""
    return partition_key(model, scheduler, request.steps, request.width, request.height,
                         request.guidance)


def latent_key(partition: str, entry: str, k: int) -> str:
    """Deterministic: a redelivered generation overwrites its latents, never duplicates them."""
    return f"cache/{partition}/{entry}/k{k:03d}.safetensors"


def entry_prefix(partition: str, entry: str) -> str:
    return f"cache/{partition}/{entry}/"

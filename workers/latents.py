"""Cached latents as fp16 safetensors objects, checked on the way back in.

A latent is only ever decoded into an image after it proves to be what the job expects:
a readable safetensors file holding one fp16 tensor of the job's latent shape, written for
the job's cache partition (so a latent of another model or size is refused).
"""

from __future__ import annotations

import json
import logging
import struct

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from cachemgr.keys import latent_key
from core.errors import CorruptLatent, T2IError
from core.objectstore import ObjectStore

log = logging.getLogger(__name__)

TENSOR_NAME = "latent"


def encode_latent(latent: torch.Tensor, partition: str) -> bytes:
    return save_safetensors({TENSOR_NAME: latent.detach().to("cpu", torch.float16).contiguous()},
                            metadata={"partition": partition})


def _metadata(data: bytes) -> dict[str, str]:
    # safetensors layout: little-endian u64 header length, then a JSON header.
    if len(data) < 8:
        raise CorruptLatent(f"{len(data)} bytes is too short for safetensors")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise CorruptLatent(f"header of {length} bytes exceeds the {len(data)}-byte object")
    try:
        return json.loads(data[8:8 + length]).get("__metadata__") or {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptLatent(f"unreadable safetensors header: {exc}") from None


def decode_latent(data: bytes, partition: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The fp32 latent, or CorruptLatent saying what is wrong with it."""
    found_partition = _metadata(data).get("partition")
    if found_partition != partition:
        raise CorruptLatent(f"latent of partition {found_partition!r}, job needs {partition!r}")
    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad bytes
        raise CorruptLatent(f"unreadable safetensors: {exc}") from None
    latent = tensors.get(TENSOR_NAME)
    if latent is None:
        raise CorruptLatent(f"no {TENSOR_NAME!r} tensor (has {sorted(tensors)})")
    if latent.dtype != torch.float16:
        raise CorruptLatent(f"dtype {latent.dtype}, expected torch.float16")
    if tuple(latent.shape) != tuple(shape):
        raise CorruptLatent(f"shape {tuple(latent.shape)}, expected {tuple(shape)}")
    if not torch.isfinite(latent).all():
        raise CorruptLatent("latent holds NaN or infinite values")
    return latent.float()


def save_latents(objects: ObjectStore, partition: str, entry: str,
                 captured: dict[int, torch.Tensor]) -> dict[int, int]:
    """Upload each captured latent; returns {K: bytes} of those stored. A failed upload is
    logged and skipped: caching never fails a job."""
    stored: dict[int, int] = {}
    for k, latent in sorted(captured.items()):
        data = encode_latent(latent, partition)
        try:
            objects.put(latent_key(partition, entry, k), data)
        except T2IError as exc:
            log.warning("job %s: latent K=%d not cached: %s", entry, k, exc)
            continue
        stored[k] = len(data)
    return stored


def load_latent(objects: ObjectStore, partition: str, entry: str, k: int,
                shape: tuple[int, ...]) -> torch.Tensor:
    return decode_latent(objects.get(latent_key(partition, entry, k)), partition, shape)

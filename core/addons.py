"""Add-on modules (LoRAs, ControlNets): what a request may name, where uploads are kept, and
the checks an uploaded file or control image passes before any worker loads it. Pure: no
torch, no network.

A LoRA file is safetensors with, for each adapted linear layer of the served UNet,
``unet.<module>.lora_A.weight`` (rank x in) and ``unet.<module>.lora_B.weight`` (out x rank),
the names diffusers' ``save_lora_weights`` writes; its delta is ``scale * B @ A`` (any alpha /
rank factor folded into B). Targets are the attention projections (``to_q``, ``to_k``,
``to_v``, ``to_out.0``), the layers LoRAs for Stable Diffusion adapt; a GPU worker publishes
their shapes for the model it serves (``targets_key``) and uploads are checked against them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from core.errors import InvalidRequest

MAX_LORAS = 3                 # adapters one request may stack
MIN_SCALE, MAX_SCALE = -2.0, 2.0
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_TENSOR = re.compile(r"unet\.(?P<module>[\w.]+)\.lora_(?P<part>[AB])\.weight")
_DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4}
TARGET_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0")
ADDON_PREFIX = "addons"
TENANTS_PREFIX = f"{ADDON_PREFIX}/tenants/"   # every tenant's registry entries


@dataclass(frozen=True)
class LoraRef:
    """One adapter a request applies: its name in the tenant's registry, its scale, and the
    digest of the file the name held when the job was accepted (what workers load and what
    the cache partition names, so a replaced upload never mixes with the old one)."""

    name: str
    scale: float
    digest: str = ""


def check_name(name: Any, field: str = "name") -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequest(field, f"{name!r} is not an add-on name (1 to 64 of a-z, 0-9, "
                                    "'.', '_', '-', starting with a letter or digit)")
    return name


def parse_loras(value: Any) -> tuple[LoraRef, ...]:
    """A request's ``loras``: a list of ``{"name", "scale"}`` (scale defaults to 1)."""
    if not isinstance(value, list):
        raise InvalidRequest("loras", f"must be a list of {{name, scale}}, got "
                                      f"{type(value).__name__}")
    if len(value) > MAX_LORAS:
        raise InvalidRequest("loras", f"names {len(value)} adapters, at most {MAX_LORAS} allowed")
    refs: list[LoraRef] = []
    for index, item in enumerate(value):
        field = f"loras[{index}]"
        item = _object(field, item, ("name", "scale"))
        name = check_name(item.get("name"), f"{field}.name")
        scale = _scale(f"{field}.scale", item.get("scale", 1.0), MIN_SCALE, MAX_SCALE)
        if any(ref.name == name for ref in refs):
            raise InvalidRequest(f"{field}.name", f"{name!r} is named twice")
        refs.append(LoraRef(name, scale))
    return tuple(refs)


def _object(field: str, value: Any, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    """``value`` as an object with only the ``allowed`` keys."""
    shape = ", ".join(allowed)
    if not isinstance(value, Mapping):
        raise InvalidRequest(field, f"must be an object {{{shape}}}, got {type(value).__name__}")
    unknown = sorted(str(key) for key in value if key not in allowed)
    if unknown:
        raise InvalidRequest(f"{field}.{unknown[0]}", f"unknown field (allowed: {shape})")
    return value


def _scale(field: str, value: Any, low: float, high: float) -> float:
    """A finite number in [low, high] (not a bool), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            isinstance(value, int) or math.isfinite(value)) or not low <= value <= high:
        raise InvalidRequest(field, f"{value!r} is not a number in [{low:g}, {high:g}]")
    return float(value)


def lora_prefix(tenant: str) -> str:
    return f"{TENANTS_PREFIX}{tenant}/loras/"


def lora_key(tenant: str, name: str, digest: str) -> str:
    """A tenant's name for an upload: a small JSON entry (what the check found) keyed by
    name and content digest."""
    return f"{lora_prefix(tenant)}{name}/{digest}.json"


def blob_key(digest: str) -> str:
    """The uploaded file, by content: workers load it knowing only the digest a job carries
    (names are resolved, per tenant, when the job is accepted)."""
    return f"{ADDON_PREFIX}/blobs/{digest}.safetensors"


def parse_lora_key(key: str) -> tuple[str, str, str] | None:
    """(tenant, name, digest) of a key ``lora_key`` made; None for anything else."""
    match = re.fullmatch(rf"{ADDON_PREFIX}/tenants/(?P<tenant>[^/]+)/loras/(?P<name>[^/]+)/"
                         r"(?P<digest>[0-9a-f]{64})\.json", key)
    if not match or not _NAME.fullmatch(match["name"]):
        return None
    return match["tenant"], match["name"], match["digest"]


def targets_key(model: str) -> str:
    """Where GPU workers publish the adapter targets of the model they serve."""
    return f"{ADDON_PREFIX}/targets/{re.sub(r'[^A-Za-z0-9._-]', '_', model)}.json"


def partition_spec(loras: tuple[LoraRef, ...], lora_from: float = 0.0,
                   control: ControlRef | None = None) -> str:
    """The add-ons' part of a cache partition: each LoRA's content and scale, order kept, the
    fraction of steps run before they act, and the ControlNet with its control image and
    scale (empty without add-ons, so partitions of plain requests are unchanged)."""
    spec = ""
    if loras:
        spec = ",".join(f"{ref.digest}@{ref.scale:g}" for ref in loras) + f"|from={lora_from:g}"
    if control is not None:
        spec += f"|control={control.name}:{control.digest}@{control.scale:g}"
    return spec


def active_from(steps: int, fraction: float) -> int:
    """The first step (0-based, of an N-step grid) at which a job's adapters act: the
    earlier ones run on the base model, while the adapter loads (T2I_LORA_FROM)."""
    return min(steps - 1, math.ceil(fraction * steps)) if steps else 0


@dataclass(frozen=True)
class LoraFile:
    """What an upload check found: the adapted modules and the rank."""

    modules: tuple[str, ...]
    rank: int
    size: int


def _header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise InvalidRequest("file", f"is {len(data)} bytes, not a safetensors file")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8 or length > 16 * 2**20:
        raise InvalidRequest("file", f"is not a safetensors file (header of {length} bytes "
                                     f"in a file of {len(data)})")
    try:
        header = json.loads(data[8:8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidRequest("file", "is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise InvalidRequest("file", "is not a safetensors file (header is not an object)")
    body = len(data) - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not isinstance(info.get("shape"), list) or \
                not isinstance(info.get("data_offsets"), list) or len(info["data_offsets"]) != 2:
            raise InvalidRequest("file", f"tensor {name!r} has no shape or data offsets")
        dtype = info.get("dtype")
        if dtype not in _DTYPE_BYTES:
            raise InvalidRequest("file", f"tensor {name!r} is {dtype}; adapters are "
                                         f"{', '.join(_DTYPE_BYTES)}")
        start, end = info["data_offsets"]
        count = math.prod(info["shape"])
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= body
                and end - start == count * _DTYPE_BYTES[dtype]):
            raise InvalidRequest("file", f"tensor {name!r} has data offsets {start}..{end} "
                                         f"that do not fit its shape or the file")
    return header


def check_lora_file(data: bytes, targets: Mapping[str, tuple[int, int]], max_bytes: int,
                    max_rank: int) -> LoraFile:
    """Refuse, naming why, anything a worker should not load: not safetensors, too big,
    tensors that are not LoRA pairs of the served model's target layers, or of other
    shapes. ``targets``: {module: (out features, in features)}."""
    if len(data) > max_bytes:
        raise InvalidRequest("file", f"is {len(data)} bytes, at most {max_bytes} allowed "
                                     "(T2I_LORA_MAX_BYTES)")
    pairs: dict[str, dict[str, list[int]]] = {}
    for name, info in _header(data).items():
        if name == "__metadata__":
            continue
        match = _TENSOR.fullmatch(name)
        if not match:
            raise InvalidRequest("file", f"tensor {name!r} is not unet.<module>.lora_A.weight "
                                         "or lora_B.weight (UNet LoRAs only)")
        pairs.setdefault(match["module"], {})[match["part"]] = info["shape"]
    if not pairs:
        raise InvalidRequest("file", "holds no LoRA tensors")
    ranks = set()
    for module, parts in sorted(pairs.items()):
        if module not in targets:
            raise InvalidRequest("file", f"adapts {module!r}, not an attention projection of "
                                         "the served model")
        if set(parts) != {"A", "B"}:
            raise InvalidRequest("file", f"{module!r} has lora_{''.join(parts)} without its pair")
        out_features, in_features = targets[module]
        a, b = parts["A"], parts["B"]
        if len(a) != 2 or len(b) != 2 or a[1] != in_features or b[0] != out_features or \
                a[0] != b[1]:
            raise InvalidRequest("file", f"{module!r} has shapes A {a}, B {b}; the served "
                                         f"model needs A [r, {in_features}], "
                                         f"B [{out_features}, r]")
        ranks.add(a[0])
    rank = max(ranks)
    if not 1 <= rank <= max_rank:
        raise InvalidRequest("file", f"rank {rank} is out of range [1, {max_rank}]")
    return LoraFile(tuple(sorted(pairs)), rank, len(data))


MIN_CONTROL_SCALE, MAX_CONTROL_SCALE = 0.0, 2.0


@dataclass(frozen=True)
class ControlRef:
    """A request's ControlNet: a name the GPU workers serve (T2I_CONTROLNETS), its scale,
    and the digest of its control image (kept in the object store, ``control_key``)."""

    name: str
    scale: float
    digest: str = ""


def control_key(digest: str) -> str:
    return f"controls/{digest}.png"


def parse_controlnets(spec: str) -> dict[str, str]:
    """T2I_CONTROLNETS: ``name=path,...`` (names as add-on names; "" for none)."""
    served: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise ValueError(f"{item!r} is not name=path")
        served[check_name(name.strip(), "T2I_CONTROLNETS")] = path.strip()
    return served


def parse_control(value: Any, width: int, height: int,
                  served: Mapping[str, str]) -> tuple[ControlRef, bytes]:
    """A request's ``controlnet``: ``{"name", "image", "scale"}`` with the control image as
    base64 (a ``data:image/png;base64,`` URL or bare) of the job's own size. Returns the
    reference and the decoded image's bytes (to store under ``control_key``)."""
    value = _object("controlnet", value, ("name", "image", "scale"))
    name = value.get("name")
    if name not in served:
        raise InvalidRequest("controlnet.name", f"{name!r} is not a ControlNet served here "
                                                f"(served: {', '.join(sorted(served)) or 'none'})")
    scale = _scale("controlnet.scale", value.get("scale", 1.0), MIN_CONTROL_SCALE,
                   MAX_CONTROL_SCALE)
    image = value.get("image")
    if not isinstance(image, str):
        raise InvalidRequest("controlnet.image", "must be a base64 image (PNG or JPEG)")
    encoded = image.split(",", 1)[1] if image.startswith("data:") else image
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("controlnet.image", "is not base64") from None
    try:
        with Image.open(io.BytesIO(data)) as picture:
            size, kind = picture.size, picture.format
            picture.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise InvalidRequest("controlnet.image", "is not a PNG or JPEG image") from None
    if kind not in ("PNG", "JPEG"):
        raise InvalidRequest("controlnet.image", f"is {kind}, not PNG or JPEG")
    if size != (width, height):
        raise InvalidRequest("controlnet.image", f"is {size[0]}x{size[1]}, the job is "
                                                 f"{width}x{height}")
    return ControlRef(str(name), scale, hashlib.sha256(data).hexdigest()), data

"""Add-on requests and upload checks (core.addons): pure, no torch (the files are built by
hand in safetensors' layout, as an attacker or a wrong exporter would); control images."""

from __future__ import annotations

import base64
import io
import json
import struct
from dataclasses import replace

import pytest
from PIL import Image

from cachemgr.keys import request_partition
from core.addons import (
    LoraRef,
    active_from,
    check_lora_file,
    lora_key,
    parse_control,
    parse_controlnets,
    parse_lora_key,
    parse_loras,
    partition_spec,
)
from core.errors import InvalidRequest
from core.jobs import JobRequest, RequestLimits, parse_request

TARGETS = {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64),
           "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (64, 32)}


def safetensors(tensors: dict[str, tuple[str, list[int]]], pad: int = 0,
                header: bytes | None = None) -> bytes:
    """A file of zero-filled tensors {name: (dtype, shape)}."""
    layout, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = {"F32": 4, "F16": 2, "I64": 8}[dtype]
        for dim in shape:
            size *= dim
        layout[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    head = header if header is not None else json.dumps(layout).encode()
    return struct.pack("<Q", len(head)) + head + bytes(offset + pad)


def pair(module: str, rank: int, out_features: int, in_features: int,
         dtype: str = "F32") -> dict[str, tuple[str, list[int]]]:
    return {f"unet.{module}.lora_A.weight": (dtype, [rank, in_features]),
            f"unet.{module}.lora_B.weight": (dtype, [out_features, rank])}


def good_file(rank: int = 4) -> bytes:
    tensors = {}
    for module, (out_features, in_features) in TARGETS.items():
        tensors |= pair(module, rank, out_features, in_features)
    return safetensors(tensors)


def check(data: bytes, max_bytes: int = 2**20, max_rank: int = 16):
    return check_lora_file(data, TARGETS, max_bytes, max_rank)


def test_a_lora_of_the_served_models_attention_layers_passes():
    found = check(good_file())
    assert found.rank == 4 and found.modules == tuple(sorted(TARGETS))


@pytest.mark.parametrize("data, says", [
    (b"not a model", "not a safetensors file"),
    (struct.pack("<Q", 10**9) + b"{}", "header of 1000000000 bytes"),
    (safetensors({}, header=b"[1, 2]"), "header is not an object"),
    (safetensors({}, header=b"\xff\xfe"), "header is not JSON"),
    (safetensors({}), "holds no LoRA tensors"),
    (safetensors(pair(next(iter(TARGETS)), 4, 64, 64, dtype="I64")), "is I64"),
    (safetensors({"text_encoder.layer.lora_A.weight": ("F32", [4, 64])}), "UNet LoRAs only"),
    (safetensors(pair("conv_in", 4, 32, 4)), "'conv_in', not an attention projection"),
    (safetensors(pair(next(iter(TARGETS)), 4, 64, 32)), "needs A [r, 64], B [64, r]"),
    (safetensors({f"unet.{next(iter(TARGETS))}.lora_A.weight": ("F32", [4, 64])}),
     "lora_A without its pair"),
    (good_file(rank=32), "rank 32 is out of range [1, 16]"),
])
def test_files_a_worker_should_not_load_are_refused_naming_why(data, says):
    with pytest.raises(InvalidRequest) as refused:
        check(data)
    assert refused.value.field == "file" and says in refused.value.message


def test_offsets_that_point_outside_the_file_are_refused():
    data = good_file()
    head_length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + head_length])
    first = next(iter(header))
    header[first]["data_offsets"][1] += 10**6
    with pytest.raises(InvalidRequest, match="do not fit"):
        check(safetensors({}, header=json.dumps(header).encode(), pad=len(data)))


def test_a_file_over_the_limit_is_refused_before_it_is_parsed():
    with pytest.raises(InvalidRequest, match="at most 100 allowed"):
        check(good_file(), max_bytes=100)


def test_requests_name_loras_with_scales():
    assert parse_loras([{"name": "ink", "scale": 0.5}, {"name": "noir"}]) == (
        LoraRef("ink", 0.5), LoraRef("noir", 1.0))
    request = parse_request({"prompt": "a cat", "loras": [{"name": "ink"}]}, RequestLimits(), 1)
    assert request.loras == (LoraRef("ink", 1.0),)
    assert JobRequest.from_json(request.to_json()) == request
    assert parse_request({"prompt": "a cat"}, RequestLimits(), 1).loras == ()


@pytest.mark.parametrize("loras, field", [
    ("ink", "loras"), ([{"name": "a"}] * 4, "loras"), (["ink"], "loras[0]"),
    ([{"name": "Ink!"}], "loras[0].name"), ([{"scale": 1}], "loras[0].name"),
    ([{"name": "ink", "scale": 2.5}], "loras[0].scale"),
    ([{"name": "ink", "scale": float("nan")}], "loras[0].scale"),
    ([{"name": "ink", "scale": True}], "loras[0].scale"),
    ([{"name": "ink"}, {"name": "ink"}], "loras[1].name"),
    ([{"name": "ink", "digest": "0" * 64}], "loras[0].digest"),   # digests are never given
])
def test_bad_lora_uses_are_refused_naming_the_field(loras, field):
    with pytest.raises(InvalidRequest) as refused:
        parse_request({"prompt": "a cat", "loras": loras}, RequestLimits(), 1)
    assert refused.value.field == field


def test_adapters_act_from_a_fraction_of_the_grid():
    assert [active_from(50, f) for f in (0.0, 0.1, 0.2, 0.5)] == [0, 5, 10, 25]
    assert active_from(1, 0.5) == 0      # a one-step job still gets its adapter


def test_registry_keys_round_trip_and_the_partition_names_content_and_scale():
    key = lora_key("acme", "ink", "a" * 64)
    assert parse_lora_key(key) == ("acme", "ink", "a" * 64)
    assert parse_lora_key(key.replace(".json", ".txt")) is None
    assert parse_lora_key("addons/tenants/acme/loras/Bad!/" + "a" * 64 + ".json") is None
    assert partition_spec(()) == ""
    assert partition_spec((LoraRef("ink", 0.5, "d1"), LoraRef("noir", 1.0, "d2")), 0.2) == \
        "d1@0.5,d2@1|from=0.2"


def test_a_lora_jobs_partition_names_when_its_lora_starts_and_a_plain_jobs_does_not():
    styled = JobRequest("a cat", "", 50, 7.5, 1, 512, 512, (LoraRef("ink", 1.0, "d" * 64),))
    plain = replace(styled, loras=())

    def partition(request: JobRequest, lora_from: float) -> str:
        return request_partition("m", "ddim", "off", request, "acme", False, lora_from)

    assert partition(styled, 0.2) != partition(styled, 0.3)
    assert partition(styled, 0.2) != partition(plain, 0.2)
    assert partition(plain, 0.2) == partition(plain, 0.3)


def png_base64(width: int, height: int, kind: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buffer, format=kind)
    return base64.b64encode(buffer.getvalue()).decode()


SERVED = {"layout": "/models/layout"}


def test_a_control_image_of_the_jobs_size_is_accepted_with_its_digest():
    image = png_base64(64, 48)
    ref, data = parse_control({"name": "layout", "image": f"data:image/png;base64,{image}",
                               "scale": 0.5}, 64, 48, SERVED)
    assert (ref.name, ref.scale, len(ref.digest)) == ("layout", 0.5, 64)
    assert data.startswith(b"\x89PNG")
    assert parse_control({"name": "layout", "image": png_base64(64, 48, "JPEG")}, 64, 48,
                         SERVED)[0].scale == 1.0


@pytest.mark.parametrize("control, field, says", [
    ("layout", "controlnet", "must be an object"),
    ({"name": "depth", "image": png_base64(64, 48)}, "controlnet.name", "served: layout"),
    ({"name": "layout", "image": png_base64(64, 48), "scale": 3}, "controlnet.scale", "[0, 2]"),
    ({"name": "layout", "image": png_base64(48, 64)}, "controlnet.image",
     "is 48x64, the job is 64x48"),
    ({"name": "layout", "image": "not base64!"}, "controlnet.image", "is not base64"),
    ({"name": "layout", "image": "aGVsbG8="}, "controlnet.image", "not a PNG or JPEG"),
    ({"name": "layout", "image": png_base64(64, 48, "GIF")}, "controlnet.image", "is GIF"),
    ({"name": "layout", "image": 7}, "controlnet.image", "must be a base64 image"),
    ({"name": "layout", "image": png_base64(64, 48), "mask": 1}, "controlnet.mask", "unknown"),
])
def test_bad_controlnet_uses_are_refused_naming_the_field(control, field, says):
    with pytest.raises(InvalidRequest) as refused:
        parse_control(control, 64, 48, SERVED)
    assert refused.value.field == field and says in refused.value.message


def test_served_controlnets_parse_as_names_and_paths():
    assert parse_controlnets("layout=/m/a, depth=/m/b") == {"layout": "/m/a", "depth": "/m/b"}
    assert parse_controlnets("") == {}
    with pytest.raises(ValueError, match="not name=path"):
        parse_controlnets("layout")

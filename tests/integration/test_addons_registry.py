"""The LoRA registry on the real S3 server: uploads wait for a GPU worker's published
targets, are checked against them, replace by name, stay per tenant, and their files go
only when no tenant names them any more."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from bench.addons import random_lora
from core.addons import LoraRef, blob_key, targets_key
from core.errors import AddonNotFound, InvalidRequest, ModelNotReady
from core.objectstore import ObjectStore
from producer.addons import LoraRegistry
from workers.builtin_models import build_tiny_pipeline
from workers.lora import lora_targets

MODEL = "registry-test-model"


@pytest.fixture(scope="module")
def targets() -> dict[str, tuple[int, int]]:
    return lora_targets(build_tiny_pipeline().unet)


@pytest.fixture(scope="module")
def objects(s3_server, targets) -> ObjectStore:
    """A bucket of its own, where a GPU worker serving MODEL has published its targets."""
    store = ObjectStore.from_settings(dataclasses.replace(s3_server, s3_bucket="t2i-addons"))
    store.ensure_bucket()
    store.put(targets_key(MODEL), json.dumps(
        {name: list(shape) for name, shape in targets.items()}).encode())
    return store


def registry(objects: ObjectStore, tenant: str, model: str = MODEL) -> LoraRegistry:
    return LoraRegistry(objects, tenant, model, max_bytes=2**20, max_rank=16)


def lora(targets: dict[str, tuple[int, int]], seed: int) -> bytes:
    return random_lora(targets, rank=2, seed=seed, std=1.0)


def test_uploads_wait_for_the_served_models_targets(objects, targets):
    with pytest.raises(ModelNotReady, match="no GPU worker serving"):
        registry(objects, "acme", model="no-worker-yet").upload("ink", lora(targets, 1))
    entry = registry(objects, "acme").upload("ink", lora(targets, 1))
    assert entry["rank"] == 2 and entry["modules"] == len(targets)


def test_the_registry_keeps_names_per_tenant_and_files_by_content(objects, targets):
    acme, globex = registry(objects, "acme"), registry(objects, "globex")
    first = acme.upload("ink", lora(targets, 1))
    shared = globex.upload("ink", lora(targets, 1))           # the same file, another tenant
    assert first["digest"] == shared["digest"] == hashlib.sha256(lora(targets, 1)).hexdigest()
    second = acme.upload("ink", lora(targets, 2))             # replaced by name
    assert [e["digest"] for e in acme.list()] == [second["digest"]]
    assert acme.resolve((LoraRef("ink", 0.5),)) == (LoraRef("ink", 0.5, second["digest"]),)
    assert objects.exists(blob_key(first["digest"]))          # globex still names it
    globex.delete("ink")
    assert not objects.exists(blob_key(first["digest"]))
    assert globex.list() == [] and [e["name"] for e in acme.list()] == ["ink"]
    with pytest.raises(InvalidRequest) as refused:
        globex.resolve((LoraRef("ink", 1.0),))
    assert refused.value.field == "loras[0].name"
    with pytest.raises(AddonNotFound):
        globex.delete("ink")
    acme.delete("ink")
    assert not objects.exists(blob_key(second["digest"]))


def test_a_file_for_another_model_is_refused_and_not_kept(objects, targets):
    other = {name: (out_features * 2, in_features) for name, (out_features, in_features)
             in targets.items()}
    before = objects.keys("addons/blobs/")
    with pytest.raises(InvalidRequest, match="the served model needs"):
        registry(objects, "acme").upload("wide", lora(other, 3))
    with pytest.raises(InvalidRequest, match="not an add-on name"):
        registry(objects, "acme").upload("../etc", lora(targets, 3))
    assert objects.keys("addons/blobs/") == before


def test_a_lora_checked_for_another_model_is_refused_by_name(objects, targets):
    registry(objects, "acme").upload("old-model-style", lora(targets, 4))
    objects.put(targets_key("next-model"), objects.get(targets_key(MODEL)))
    with pytest.raises(InvalidRequest, match="was uploaded for model 'registry-test-model'"):
        registry(objects, "acme", model="next-model").resolve((LoraRef("old-model-style", 1),))

"""LoRAs through the whole stack: upload over the API (checked), a job naming one makes the
image the engine makes with that file, bad uses are refused before anything is enqueued,
tenants never see or use each other's adapters, the CLI manages them over the API, and
with two GPU workers LoRA jobs go to the one holding their LoRA while it has a free slot
(core.affinity)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

from bench.addons import random_lora
from cachemgr.catalog import Catalog
from conftest import OTHER_KEY, TENANT_KEY, finished, job_count
from core.addons import targets_key
from core.jobs import JobRequest, JobState
from core.jobstore import JobStore, connect
from core.objectstore import ObjectStore
from core.settings import Settings
from infra import servers
from infra.servers import running
from producer.cli import main as cli
from tests.engine.shared import signed_pixels
from workers.builtin_models import build_tiny_pipeline
from workers.engine import Engine
from workers.lora import AdapterConfig, lora_targets

PROMPT = "a lighthouse on a cliff at dusk"


def lora(seed: int) -> bytes:
    return random_lora(lora_targets(build_tiny_pipeline().unet), rank=4, seed=seed, std=0.5)


@pytest.fixture(scope="module")
def objects(stack: Settings) -> ObjectStore:
    """The stack's store, once its GPU worker has published the model's LoRA targets."""
    store, deadline = ObjectStore.from_settings(stack), time.monotonic() + 120
    while not store.exists(targets_key(stack.model)):
        assert time.monotonic() < deadline, "the GPU worker published no LoRA targets"
        time.sleep(0.5)
    return store


def test_a_lora_job_makes_the_image_the_engine_makes_with_that_file(stack, api, objects):
    uploaded = api.put("/v1/loras/ink-wash", content=lora(1),
                       headers={"Content-Type": "application/octet-stream"})
    assert uploaded.status_code == 201, uploaded.text
    digest = uploaded.json()["digest"]
    assert "ink-wash" in [entry["name"] for entry in api.get("/v1/loras").json()["loras"]]
    # A guidance no other test uses, so a partition of its own: a cached latent of a similar
    # prompt would let the LoRA job resume it (cross-adapter reuse), which the engine below
    # does not replay.
    body = {"prompt": "a teapot balanced on a violin", "seed": 11, "steps": 10, "width": 64,
            "height": 64, "guidance": 6.25}
    styled_id = api.post("/v1/jobs", json={**body, "loras": [{"name": "ink-wash",
                                                               "scale": 1.5}]}).json()["id"]
    plain_id = api.post("/v1/jobs", json=body).json()["id"]
    styled, plain = finished(api, styled_id), finished(api, plain_id)
    assert styled["state"] == plain["state"] == "succeeded", styled["error"]
    assert styled["cache"]["route"] == "full", styled["cache"]
    assert styled["request"]["loras"] == [{"name": "ink-wash", "scale": 1.5, "digest": digest}]
    assert styled["timings"]["adapter_wait_ms"] is not None
    styled_png = api.get(f"/v1/jobs/{styled_id}/image").content
    assert np.abs(signed_pixels(styled_png) - signed_pixels(api.get(f"/v1/jobs/{plain_id}/image").content)
                  ).max() > 10     # the adapter changed the picture, not only its rounding
    engine = Engine.load(stack.model, stack.scheduler, "cpu", stack.state_path / "models",
                         True, adapters=AdapterConfig(objects.get, 2**30, stack.lora_from))
    request = JobRequest.from_json(json.dumps(styled["request"]))
    expected = engine.generate(request, lambda step, total: None)
    assert np.abs(signed_pixels(styled_png) - signed_pixels(expected.image_png)).max() <= 1


def test_bad_lora_uses_are_refused_and_enqueue_nothing(stack, api, objects):
    api.put("/v1/loras/sketch", content=lora(2), headers={
        "Content-Type": "application/octet-stream"}).raise_for_status()
    before = job_count(stack)
    for loras, field in (([{"name": "never-uploaded"}], "loras[0].name"),
                         ([{"name": "sketch", "scale": 5}], "loras[0].scale"),
                         ("sketch", "loras")):
        refused = api.post("/v1/jobs", json={"prompt": PROMPT, "loras": loras})
        assert refused.status_code == 422 and refused.json()["error"]["field"] == field
    for name, data, says in (("bad", b"<html>not a model</html>", "not a safetensors file"),
                             ("Bad Name", lora(2), "not an add-on name"),
                             ("text", save_safetensors({"text_encoder.x.lora_A.weight":
                                                        torch.zeros(2, 2)}), "UNet LoRAs only")):
        refused = api.put(f"/v1/loras/{name}", content=data,
                          headers={"Content-Type": "application/octet-stream"})
        assert refused.status_code == 422 and says in refused.json()["error"]["message"], name
    assert job_count(stack) == before
    assert "bad" not in [entry["name"] for entry in api.get("/v1/loras").json()["loras"]]


def test_tenants_never_see_use_or_delete_each_others_loras(stack, api, objects):
    api.put("/v1/loras/private-style", content=lora(3), headers={
        "Content-Type": "application/octet-stream"}).raise_for_status()
    with httpx.Client(base_url=str(api.base_url), timeout=30,
                      headers={"Authorization": f"Bearer {OTHER_KEY}"}) as other:
        assert "private-style" not in [e["name"] for e in other.get("/v1/loras").json()["loras"]]
        used = other.post("/v1/jobs", json={"prompt": PROMPT,
                                            "loras": [{"name": "private-style"}]})
        assert used.status_code == 422 and "not an uploaded LoRA" in used.text
        assert other.delete("/v1/loras/private-style").status_code == 404
    assert api.delete("/v1/loras/private-style").json() == {"deleted": "private-style"}
    assert api.delete("/v1/loras/private-style").status_code == 404


def test_the_cli_manages_loras_over_the_api(stack, api, objects, tmp_path: Path, capsys):
    path = tmp_path / "cli-style.safetensors"
    path.write_bytes(lora(4))
    url = str(api.base_url)
    assert cli(["--api-url", url, "--api-key", TENANT_KEY, "loras", "upload", "cli-style",
                str(path)]) == 0
    assert '"rank": 4' in capsys.readouterr().out
    assert cli(["--api-url", url, "--api-key", TENANT_KEY, "loras"]) == 0
    assert "cli-style\trank 4" in capsys.readouterr().out
    assert cli(["--api-url", url, "--api-key", TENANT_KEY, "loras", "delete", "cli-style"]) == 0
    assert cli(["--api-url", url, "--api-key", TENANT_KEY, "loras", "delete", "cli-style"]) == 2
    assert "no LoRA named 'cli-style'" in capsys.readouterr().err


def test_a_lora_job_resumes_the_base_models_latent_up_to_where_its_lora_starts(stack, api,
                                                                               objects):
    api.put("/v1/loras/late-style", content=lora(5), headers={
        "Content-Type": "application/octet-stream"}).raise_for_status()
    body = {"prompt": "a red barn under a full moon", "seed": 21, "steps": 10, "width": 64,
            "height": 64}
    base = finished(api, api.post("/v1/jobs", json=body).json()["id"])
    assert base["state"] == "succeeded"
    catalog, deadline = Catalog(connect(stack.redis_url)), time.monotonic() + 60
    while catalog.entry(base["id"]) is None:   # registered by the cache queue's worker
        assert time.monotonic() < deadline, "the base job's latents were never registered"
        time.sleep(0.05)
    styled = finished(api, api.post("/v1/jobs", json={
        **body, "loras": [{"name": "late-style"}]}).json()["id"])
    lora_from = round(stack.lora_from * 10)
    assert styled["state"] == "succeeded", styled["error"]
    assert styled["cache"]["route"] == "resume" and styled["cache"]["k"] == lora_from
    assert styled["cache"]["reason"] in ("adapter cap", "hit")
    assert styled["unet_calls"] == 10 - lora_from


def test_lora_jobs_go_to_the_worker_holding_their_lora_while_it_has_a_free_slot(
        stack, api, objects, base_dir):
    jobs, broker = JobStore.from_settings(stack), connect(stack.broker)
    with running(servers.gpu_worker("gpu-second", stack), log_dir=base_dir / "logs"):
        uploaded = api.put("/v1/loras/affine", content=lora(7),
                           headers={"Content-Type": "application/octet-stream"})
        assert uploaded.status_code == 201, uploaded.text
        digest = uploaded.json()["digest"]

        def submit(prompt: str, **fields: object) -> str:
            body = {"prompt": prompt, "seed": 5, "steps": 8, "width": 64, "height": 64,
                    "guidance": 5.25, "loras": [{"name": "affine"}], **fields}
            return api.post("/v1/jobs", json=body).json()["id"]

        first = finished(api, submit("a kite over a wheat field"))
        assert first["state"] == "succeeded", first["error"]
        holder = jobs.get(first["id"]).worker.split()[0]   # "<node> pid <n>"
        said, deadline = f"t2i:worker-adapters:{holder}", time.monotonic() + 30
        while digest not in json.loads(broker.get(said) or '{"resident": []}')["resident"]:
            assert time.monotonic() < deadline, f"{holder} never said it holds the LoRA"
            time.sleep(0.1)

        for prompt in ("a kite over a frozen lake", "a kite above a harbour at noon"):
            view = finished(api, submit(prompt))
            record = jobs.get(view["id"])
            assert view["state"] == "succeeded", view["error"]
            assert record.extra.get("affinity") == holder
            assert record.worker.startswith(holder + " ")

        # The holder busy with a long job (its one slot taken): the next goes to the shared
        # queue, where the other worker takes it rather than it waiting for the holder.
        long_id = submit("a kite in a thunderstorm", steps=150, width=256, height=256)
        deadline = time.monotonic() + 60
        while jobs.get(long_id).state is not JobState.GENERATING:
            assert time.monotonic() < deadline, "the long job never started"
            time.sleep(0.05)
        assert jobs.get(long_id).worker.startswith(holder + " ")
        spilled = finished(api, submit("a kite tangled in a tree"))
        record = jobs.get(spilled["id"])
        assert spilled["state"] == "succeeded", spilled["error"]
        assert jobs.get(long_id).state is JobState.GENERATING or \
            jobs.get(long_id).finished_at > record.triage_finished_at, "the holder was idle"
        assert "affinity" not in record.extra
        assert not record.worker.startswith(holder + " ")
        assert finished(api, long_id)["state"] == "succeeded"

"""Approximate caching end to end: real Redis, S3, embedded Chroma, Celery triage/cache and
GPU workers with the tiny test model. Jobs here use 64x64, partitions no other test module
uses: 10 steps (K values out of 10, the reference table scaled: {1..5}) from one seed, and
25 steps for hits from other seeds, whose K is capped at 2 of 50, i.e. 1 of 25 (0 of 10)."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
from PIL import Image

from cachemgr.catalog import Catalog
from cachemgr.keys import latent_key
from cachemgr.ktable import REFERENCE_TABLE
from core.jobstore import connect
from core.objectstore import ObjectStore
from core.plan import CachePlan
from producer.client import Client
from workers.embedder import MiniLMEmbedder
from workers.latents import encode_latent

pytestmark = pytest.mark.e2e

STEPS = 10
REROLL_STEPS = 25
ORIGINAL = "an oil painting of a lighthouse on a cliff at sunset"
CLOSE_EDIT = "a painting of a lighthouse on a cliff at dusk"
UNRELATED = "a bowl of ramen noodles, food photography"


@pytest.fixture(scope="module")
def client(stack) -> Client:
    return Client(stack)


@pytest.fixture(scope="module")
def catalog(stack) -> Catalog:
    return Catalog(connect(stack.redis_url))


def submit_and_wait(client: Client, prompt: str, **params) -> dict:
    job_id = client.submit(prompt, steps=params.pop("steps", STEPS), seed=params.pop("seed", 1),
                           **params)
    view = client.wait(job_id, timeout=180)
    assert view["state"] == "succeeded", view
    return view


def wait_for_items(catalog: Catalog, entry: str, expected: set[int]) -> None:
    deadline = time.monotonic() + 60
    while catalog.stored_ks(entry) != expected:
        assert time.monotonic() < deadline, f"entry {entry} has {catalog.stored_ks(entry)}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def original(client: Client, catalog: Catalog) -> dict:
    """Prompt A runs in full and registers its 5 latents."""
    view = submit_and_wait(client, ORIGINAL)
    wait_for_items(catalog, view["id"], set(REFERENCE_TABLE.k_set(STEPS)))
    return view


@pytest.fixture(scope="module")
def original_25_steps(client: Client, catalog: Catalog) -> dict:
    """Prompt A at 25 steps: besides its table Ks it keeps K 1, the seed cap."""
    view = submit_and_wait(client, ORIGINAL, steps=REROLL_STEPS)
    wait_for_items(catalog, view["id"], set(REFERENCE_TABLE.k_set(REROLL_STEPS)) | {1})
    return view


def plan(client: Client, view: dict) -> CachePlan:
    """The job's plan as the GPU worker reads it (entry and partition are not public)."""
    found = client.jobs.get(view["id"]).plan
    assert found is not None, view
    return found


def pixels(client: Client, job_id: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(client.result(job_id))), dtype=np.float32)


def test_first_prompt_runs_full_and_registers_five_items(original, catalog, stack, client):
    assert original["cache"]["route"] == "full" and original["cache"]["reason"] == "miss"
    assert original["unet_calls"] == STEPS
    objects = ObjectStore.from_settings(stack)
    for k in (1, 2, 3, 4, 5):
        item = catalog.item(original["id"], k)
        assert item is not None and item.hits == 0 and item.size > 0
        assert objects.exists(latent_key(plan(client, original).partition, original["id"], k))


def test_an_identical_request_is_answered_by_the_exact_path_with_no_step(original, client):
    view = submit_and_wait(client, ORIGINAL)
    assert view["cache"]["route"] == "exact" and view["cache"]["reason"] == "exact repeat"
    assert view["unet_calls"] == 0 and view["id"] != original["id"]
    assert client.result(view["id"]) == client.result(original["id"])


def test_two_identical_requests_in_flight_make_one_generation(original, client):
    busy = client.submit("keeps the GPU worker busy", steps=150, width=128, height=128)
    prompt = "a lighthouse in the fog, two identical requests"
    first, second = (client.submit(prompt, steps=STEPS, seed=9) for _ in range(2))
    deadline = time.monotonic() + 60
    while client.status(second)["cache"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.status(second)["cache"]["reason"] == "identical in flight"
    client.cancel(busy)
    lead, follower = (client.wait(job_id, timeout=180) for job_id in (first, second))
    assert lead["state"] == follower["state"] == "succeeded"
    assert lead["cache"]["route"] == "full" and lead["unet_calls"] == STEPS
    assert follower["cache"]["route"] == "exact" and follower["unet_calls"] == 0
    assert client.result(second) == client.result(first)


def test_a_reroll_resumes_from_the_seed_cap_with_its_own_noise(original_25_steps, client,
                                                               catalog):
    original = original_25_steps
    view = submit_and_wait(client, ORIGINAL, steps=REROLL_STEPS, seed=3)
    assert view["cache"]["route"] == "resume" and view["cache"]["reason"] == "seed-change cap"
    assert view["cache"]["seed_rule"] == "noise swap"
    assert view["cache"]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert plan(client, view).entry == original["id"] and view["cache"]["k"] == 1
    assert view["unet_calls"] == REROLL_STEPS - 1
    assert view["progress"]["total"] == REROLL_STEPS - 1
    assert catalog.item(original["id"], 1).hits >= 1
    difference = np.abs(pixels(client, view["id"]) - pixels(client, original["id"]))
    assert difference.mean() > 1.0  # another seed: another picture


def test_at_10_steps_another_seed_runs_in_full(original, client):
    view = submit_and_wait(client, ORIGINAL, seed=4)
    assert view["cache"]["route"] == "full" and view["cache"]["reason"] == "seed-change cap"
    assert view["unet_calls"] == STEPS


def test_close_edit_resumes_with_the_k_its_similarity_earns(original, client):
    embedder = MiniLMEmbedder()
    vectors = embedder.embed([ORIGINAL, CLOSE_EDIT])
    similarity = float(vectors[0] @ vectors[1])
    expected_k = REFERENCE_TABLE.k_for(similarity, STEPS)
    assert expected_k is not None and expected_k < 5  # the edit is close, not identical
    view = submit_and_wait(client, CLOSE_EDIT)
    assert view["cache"]["route"] == "resume" and plan(client, view).entry == original["id"]
    assert view["cache"]["similarity"] == pytest.approx(similarity, abs=1e-3)
    assert view["cache"]["k"] == expected_k and view["unet_calls"] == STEPS - expected_k


def test_a_resumed_job_keeps_its_latents_above_k_and_its_repeat_resumes_from_them(
        original, client, catalog):
    edit = "an oil painting of a lighthouse on a cliff at night"
    first = submit_and_wait(client, edit)
    assert first["cache"]["route"] == "resume" and 0 < first["cache"]["k"] < 5
    wait_for_items(catalog, first["id"], set(range(first["cache"]["k"] + 1, 6)))
    # The same seed (another negative prompt, so not an identical request): no seed cap.
    reroll = submit_and_wait(client, edit, negative_prompt="blurry")
    assert reroll["cache"]["reason"] == "hit"
    assert reroll["cache"]["similarity"] == pytest.approx(1.0, abs=1e-5)
    # A chain (steps 1..K of the original, then the edit's): allowed, as the original is
    # exactly as near the edit as it was when the edit resumed from it.
    chain = plan(client, reroll).source_lineage
    assert [segment.source for segment in chain.segments] == [original["id"], first["id"]]
    assert plan(client, reroll).entry == first["id"] and reroll["cache"]["k"] == 5


def test_unrelated_prompt_runs_full(original, client):
    view = submit_and_wait(client, UNRELATED)
    assert view["cache"]["route"] == "full" and view["cache"]["reason"] == "below threshold"
    assert view["cache"]["similarity"] < 0.65 and view["unet_calls"] == STEPS


def test_other_size_is_another_partition_and_never_offered(original, client):
    view = submit_and_wait(client, ORIGINAL, width=72)
    assert view["cache"]["route"] == "full" and view["cache"]["reason"] == "miss"
    assert plan(client, view).partition != plan(client, original).partition


def _truncate(objects: ObjectStore, key: str) -> None:
    objects.put(key, objects.get(key)[:100])


def _from_another_model(objects: ObjectStore, key: str) -> None:
    objects.put(key, encode_latent(torch.randn(1, 4, 8, 8), "another-model-partition"))


def _wrong_shape(objects: ObjectStore, key: str) -> None:
    partition = key.split("/")[1]
    objects.put(key, encode_latent(torch.randn(1, 4, 16, 16), partition))


@pytest.mark.parametrize("spoil, seed", [(ObjectStore.delete, 20), (_truncate, 21),
                                         (_from_another_model, 22), (_wrong_shape, 23)],
                         ids=["deleted", "truncated", "another-model", "wrong-shape"])
def test_latent_spoiled_between_triage_and_generation_falls_back_to_full(
        original_25_steps, client, catalog, stack, spoil, seed):
    busy = client.submit("keeps the GPU worker busy", steps=150, width=128, height=128)
    job_id = client.submit(ORIGINAL, steps=REROLL_STEPS, seed=seed)  # a re-roll: not exact
    deadline = time.monotonic() + 60
    while (view := client.status(job_id))["cache"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert view["cache"]["route"] == "resume" and view["state"] == "queued"
    planned = plan(client, view)
    spoiled = latent_key(planned.partition, planned.entry, planned.k)
    spoil(ObjectStore.from_settings(stack), spoiled)
    client.cancel(busy)
    view = client.wait(job_id, timeout=180)
    assert view["state"] == "succeeded"
    assert "unusable" in view["cache"]["fallback"] and view["unet_calls"] == REROLL_STEPS
    # Dropped, so the next identical prompt is not sent to it again.
    assert catalog.item(planned.entry, planned.k) is None
    assert not ObjectStore.from_settings(stack).exists(spoiled)
    # This job's own latents (K 1, the seed cap at 25 steps, among them) are what the next
    # case's re-roll resumes from: wait for their registration, which follows the job's
    # success, so that the next case does not race it (seen under load in the full suite).
    deadline = time.monotonic() + 60
    while 1 not in catalog.stored_ks(job_id):
        assert time.monotonic() < deadline, catalog.stored_ks(job_id)
        time.sleep(0.05)


def test_maintenance_tasks_run_on_the_cache_worker(stack, original):
    """Beat sends these; here they are sent directly and their results read back."""
    from workers.app import make_app

    celery = make_app(stack)
    evict = celery.send_task("cache.evict").get(timeout=120)
    assert evict["ran"] is False and evict["evicted"] == 0  # well within the default budget
    sweep = celery.send_task("cache.sweep").get(timeout=120)
    assert sweep == {"orphan_objects": 0, "missing_objects": 0, "orphan_vectors": 0,
                     "reindexed": 0}
    train = celery.send_task("cache.train_predictor").get(timeout=120)
    assert train["trained"] is False and train["samples"] >= 1  # the hits above were samples

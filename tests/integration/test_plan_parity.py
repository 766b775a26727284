"""One plan for triage and the simulator: the same requests, fed through live triage (the
Celery task's code with real Redis, embedded Chroma and MiniLM, registering what each job
keeps through the registration task's code) and through the offline simulator, get the same
plan for every request: route, reason, the K earned and the K used, the similarity, and the
cached prompt they resume from."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cachemgr.catalog import Catalog
from cachemgr.identical import IdenticalRequests
from cachemgr.keys import identical_key, request_partition
from cachemgr.ktable import REFERENCE_TABLE
from cachemgr.plan import kept_ks
from cachemgr.policies import policy_by_name
from cachemgr.predictor import AlwaysLookUp
from cachemgr.simulator import SimConfig, SimRequest, simulate
from cachemgr.vectors import VectorIndex
from core.jobs import JobRecord, JobRequest, JobState, image_key
from core.jobstore import JobStore, connect
from core.objectstore import InMemoryObjectStore
from core.plan import Route
from core.stepcache import OFF
from workers.embedder import MiniLMEmbedder
from workers.triage import CacheRouter, register_entry

# A session of two tenants: repeats, re-rolls, one-word edits, rephrasings, unrelated
# prompts, and two step counts (partitions of their own).
SCENES = ["a red disc at left, blue background", "a huge red disc at left, blue background",
          "a red disc at right, blue background", "a green square in the middle, white background",
          "a green square in the middle, black background", "two yellow stars over a lake",
          "a lighthouse on a cliff at sunset", "an oil painting of a lighthouse at dusk",
          "a bowl of ramen noodles", "a red disc at left, blue background"]
REQUESTS = [(tenant, prompt, steps) for tenant, prompt, steps in itertools.islice(
    itertools.cycle([(t, p, s) for s in (50, 20) for t in ("acme", "globex") for p in SCENES]),
    60)]
REQUESTS = [REQUESTS[i] for i in np.random.default_rng(3).permutation(len(REQUESTS))]
REQUESTS += REQUESTS[:12]  # then the first dozen again: with their seeds, identical requests
SEEDS = list(range(60)) + list(range(12))


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    return MiniLMEmbedder()


def live_plans(embedder, redis_url: str, tmp_path) -> list:
    client = connect(redis_url)
    for key in [*client.scan_iter("t2i:cache:*"), *client.scan_iter("t2i:identical:*")]:
        client.delete(key)
    jobs, catalog = JobStore(client, 3600), Catalog(client)
    identical, objects = IdenticalRequests(client, 3600), InMemoryObjectStore()
    vectors = VectorIndex.open(tmp_path / "chroma", "", embedder.name)
    router = CacheRouter(embedder, vectors, catalog, identical, objects, jobs, REFERENCE_TABLE,
                         AlwaysLookUp(), "tiny", "ddim", shared=False)
    plans = []
    for i, ((tenant, prompt, steps), seed) in enumerate(zip(REQUESTS, SEEDS)):
        record = JobRecord(id=f"{i}", state=JobState.TRIAGE, model="tiny", submitted_at=i,
                           tenant=tenant, request=JobRequest(prompt, "", steps, 7.5, seed, 64, 64))
        jobs.create(record)
        plan = router(record).plan
        plans.append(plan)
        if plan.route is Route.EXACT:
            continue
        # What the GPU worker does once the job is done: store the image, tell identical
        # requests, register the latents it kept.
        objects.put(image_key(record.id), b"png")
        jobs.update(record.id, lambda r, plan=plan: r.transition(JobState.QUEUED, plan=plan))
        identical.remember(identical_key(plan.partition, record.request), record.id)
        identical.land(identical_key(plan.partition, record.request), record.id)
        kept = kept_ks(plan, REFERENCE_TABLE, steps, admit_resumed=True)
        if kept:
            register_entry(record.id, plan.partition, {k: 100 for k in kept}, jobs, embedder,
                           vectors, catalog, lambda now=float(i): now)
    return plans


def simulated_plans(embedder) -> list:
    requests = [SimRequest(tenant, prompt, steps, request_partition(
        "tiny", "ddim", OFF, JobRequest(prompt, "", steps, 7.5, 0, 64, 64), tenant, False), seed)
        for (tenant, prompt, steps), seed in zip(REQUESTS, SEEDS)]
    embeddings = embedder.embed([prompt for _, prompt, _ in REQUESTS]).astype(np.float32)
    config = SimConfig(policy_by_name("lcbfu"), REFERENCE_TABLE, admit_resumed=True,
                       keep_plans=True)
    return simulate(requests, embeddings, np.arange(len(REQUESTS), dtype=float), config).plans


def test_live_triage_and_the_simulator_make_the_same_plan_for_every_request(
        embedder, redis_url, tmp_path):
    live, offline = live_plans(embedder, redis_url, tmp_path), simulated_plans(embedder)
    assert len(live) == len(offline) == len(REQUESTS)
    prompt_of = [prompt for _, prompt, _ in REQUESTS]
    for i, (a, b) in enumerate(zip(live, offline)):
        assert (a.route, a.reason, a.wanted_k, a.k, a.partition, a.reseed) == \
            (b.route, b.reason, b.wanted_k, b.k, b.partition, b.reseed), (i, a, b)
        if a.similarity is not None or b.similarity is not None:
            assert a.similarity == pytest.approx(b.similarity, abs=1e-4), (i, a, b)
        if a.route is not Route.FULL:  # copies of one prompt may tie: compare what was cached
            assert prompt_of[int(a.entry)] == prompt_of[int(b.entry)], (i, a, b)
            assert [s.prompt for s in a.source_lineage.segments] == \
                [s.prompt for s in b.source_lineage.segments] if a.source_lineage else \
                b.source_lineage is None, (i, a, b)
    routes = [plan.route for plan in live]
    assert routes.count(Route.RESUME) >= 20 and routes.count(Route.FULL) >= 20  # both tried
    assert routes.count(Route.EXACT) == 12 and any(plan.reseed for plan in live)
    assert len({plan.reason for plan in live}) >= 3

"""The GPU worker's and triage's job handling in process, with the stores' in-memory twins
and injected time (no Redis, no S3, no Celery): the tiny diffusers pipeline is real. What the
fault tests show end to end, here one rule at a time."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from cachemgr.catalog import InMemoryCatalog
from cachemgr.identical import InMemoryIdenticalRequests
from cachemgr.keys import latent_key
from cachemgr.ktable import REFERENCE_TABLE
from cachemgr.predictor import AlwaysLookUp
from core.errors import ObjectStoreUnavailable
from core.jobs import JobRecord, JobRequest, JobState, RequestLimits
from core.jobstore import InMemoryJobStore
from core.objectstore import InMemoryObjectStore
from core.plan import CachePlan, Reason, Route
from workers.builtin_models import build_tiny_pipeline
from workers.engine import Engine
from workers.generation import CacheConfig, Reliability, generate_full, generate_resume, store_image
from workers.latents import save_latents
from workers.triage import CacheRouter, Triaged, register_entry, triage_job

STEPS = 10
REQUEST = JobRequest("a red fox in the snow", "", STEPS, 7.5, 5, 64, 64)


class Clock:
    """Injected time: ``sleep`` advances it instead of waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(build_tiny_pipeline(), "ddim", torch.device("cpu"), "tiny (test)")


@pytest.fixture
def clock() -> Clock:
    return Clock()


def job(jobs: InMemoryJobStore, state: JobState = JobState.QUEUED, **fields: object) -> str:
    return jobs.create(JobRecord(id="job-1", state=state, request=REQUEST, model="tiny",
                                 submitted_at=0.0, **fields))


def cache_config(catalog: InMemoryCatalog, registered: list,
                 identical: InMemoryIdenticalRequests | None = None,
                 retriaged: list | None = None) -> CacheConfig:
    return CacheConfig("tiny", "ddim", False, REFERENCE_TABLE, catalog,
                       lambda entry, partition, sizes: registered.append((entry, sizes)),
                       identical or InMemoryIdenticalRequests(),
                       (retriaged if retriaged is not None else []).append)


def test_a_job_runs_stores_its_image_and_keeps_its_latents(engine, clock):
    jobs, objects, registered = InMemoryJobStore(), InMemoryObjectStore(), []
    job(jobs)
    outcome = generate_full("job-1", jobs, objects, engine, "w1", clock,
                            cache_config(InMemoryCatalog(), registered), Reliability(sleep=clock.sleep))
    record = jobs.get("job-1")
    assert outcome["state"] == "succeeded" and record.state is JobState.SUCCEEDED
    assert objects.get(record.image_key).startswith(b"\x89PNG")
    assert record.deliveries == 1 and record.extra["unet_calls"] == STEPS
    assert [entry for entry, _ in registered] == ["job-1"]
    assert set(registered[0][1]) == set(REFERENCE_TABLE.k_set(STEPS)) == {1, 2, 3, 4, 5}


def test_a_poison_job_is_failed_once_its_workers_died_max_deliveries_times(engine, clock):
    jobs = InMemoryJobStore()
    job(jobs, JobState.GENERATING, deliveries=3, worker="gpu@host pid 7")
    outcome = generate_full("job-1", jobs, InMemoryObjectStore(), engine, "w2", clock, None,
                            Reliability(max_deliveries=3, sleep=clock.sleep))
    record = jobs.get("job-1")
    assert outcome == {"job_id": "job-1", "skipped": True}
    assert record.state is JobState.FAILED and "each of 3 deliveries" in record.error
    assert "gpu@host pid 7" in record.error


def test_a_redelivery_below_the_limit_runs_again(engine, clock):
    jobs = InMemoryJobStore()
    job(jobs, JobState.GENERATING, deliveries=2)
    generate_full("job-1", jobs, InMemoryObjectStore(), engine, "w2", clock, None,
                  Reliability(max_deliveries=3, sleep=clock.sleep))
    assert jobs.get("job-1").state is JobState.SUCCEEDED and jobs.get("job-1").deliveries == 3


def test_a_cancel_is_honoured_at_the_next_step(engine, clock):
    class CancelAtStep3(InMemoryJobStore):
        def report_progress(self, job_id: str, step: int, total: int,
                            progress_webhook: bool = False) -> bool:
            if step == 3:
                self.request_cancel(job_id, clock())
            return super().report_progress(job_id, step, total)

    jobs = CancelAtStep3()
    job(jobs)
    calls: list[int] = []
    hook = engine.pipe.unet.register_forward_hook(lambda *args: calls.append(1))
    try:
        outcome = generate_full("job-1", jobs, InMemoryObjectStore(), engine, "w", clock, None,
                                Reliability(sleep=clock.sleep))
    finally:
        hook.remove()
    assert outcome["state"] == "cancelled" and jobs.get("job-1").state is JobState.CANCELLED
    assert len(calls) == 3  # step 3 ran, the fourth never started


def test_a_corrupt_cached_latent_falls_back_to_full_and_is_dropped(engine, clock):
    """The delivery is counted before the latent is fetched (a fetch that killed the worker
    would count towards the poison rule), and once: the fallback runs in the same delivery."""
    fetched_while: list[tuple[JobState, int]] = []

    class Watching(InMemoryObjectStore):
        def get(self, key: str) -> bytes:
            if key.endswith("/k004.safetensors") and "job-1" in jobs.records:
                record = jobs.get("job-1")
                fetched_while.append((record.state, record.deliveries))
            return super().get(key)

    jobs, objects, catalog, registered = (InMemoryJobStore(), Watching(), InMemoryCatalog(),
                                          [])
    cache = cache_config(catalog, registered)
    source = JobRecord(id="source", state=JobState.SUCCEEDED, request=REQUEST, model="tiny",
                       submitted_at=0.0)
    partition = cache.partition(source)
    sizes = save_latents(objects, partition, "source", {4: torch.zeros(1, 4, 8, 8)})
    catalog.register("source", partition, sizes, 0.0, REQUEST.prompt)
    key = latent_key(partition, "source", 4)
    objects.put(key, objects.get(key)[:40])  # truncated
    job(jobs, route="gen.resume", plan=CachePlan(Route.RESUME, Reason.HIT, partition,
                                                  "source", 4, 4, 0.99, looked_up=True))
    generate_resume("job-1", jobs, objects, engine, "w", clock, cache,
                    Reliability(sleep=clock.sleep))
    record = jobs.get("job-1")
    assert record.state is JobState.SUCCEEDED and "unusable" in record.extra["fallback"]
    assert fetched_while == [(JobState.GENERATING, 1)] and record.deliveries == 1
    assert record.extra["unet_calls"] == STEPS
    assert record.public()["cache"]["route"] == "full"
    assert catalog.item("source", 4) is None and not objects.exists(key)
    assert registered[0][0] == "job-1" and set(registered[0][1]) == {1, 2, 3, 4, 5}


def test_a_finished_image_waits_out_a_short_object_store_outage(clock):
    jobs, objects = InMemoryJobStore(), InMemoryObjectStore()
    job(jobs, JobState.GENERATING)
    objects.down = True

    def back_after_three_waits(seconds: float) -> None:
        clock.sleep(seconds)
        objects.down = len(clock.slept) < 3

    store_image("job-1", b"png", jobs, objects, clock,
                Reliability(store_outage_s=30.0, sleep=back_after_three_waits))
    record = jobs.get("job-1")
    assert record.state is JobState.SUCCEEDED and objects.get(record.image_key) == b"png"
    assert clock.slept == [0.5, 1.0, 2.0]
    assert record.extra["waited_for_object_store_s"] == 3.5


def test_an_object_store_outage_longer_than_the_budget_is_raised(clock):
    jobs, objects = InMemoryJobStore(), InMemoryObjectStore()
    job(jobs, JobState.GENERATING)
    objects.down = True
    with pytest.raises(ObjectStoreUnavailable):
        store_image("job-1", b"png", jobs, objects, clock,
                    Reliability(store_outage_s=10.0, sleep=clock.sleep))
    assert sum(clock.slept) <= 10.0 and jobs.get("job-1").state is JobState.GENERATING


def planned(record: JobRecord) -> Triaged:
    return Triaged(CachePlan(Route.FULL, Reason.MISS, "p", looked_up=True), {"embed_ms": 1.0})


def test_triage_routes_once_and_a_redelivery_resends_without_deciding_again(clock):
    jobs, sent, decided = InMemoryJobStore(), [], []

    def decide(record: JobRecord) -> Triaged:
        decided.append(record.id)
        return planned(record)

    job(jobs)
    triage_job("job-1", jobs, RequestLimits(), decide, lambda task, job_id: sent.append(task),
               clock, InMemoryObjectStore())
    assert sent == ["gen.full"] and decided == ["job-1"]
    record = jobs.get("job-1")
    assert record.state is JobState.QUEUED and record.plan.reason is Reason.MISS
    # the triage worker died before acking: the same message comes back
    again = triage_job("job-1", jobs, RequestLimits(), decide,
                       lambda task, job_id: sent.append(task), clock, InMemoryObjectStore())
    assert again["resent"] and sent == ["gen.full", "gen.full"] and decided == ["job-1"]


def test_triage_sends_a_job_to_the_worker_it_prefers_in_that_workers_own_queue(clock):
    """The record keeps the shared route (what a re-send after a lost message uses) and
    names the worker chosen (core.affinity)."""
    jobs, sent = InMemoryJobStore(), []
    job(jobs)
    outcome = triage_job("job-1", jobs, RequestLimits(), planned,
                         lambda task, job_id, **options: sent.append((task, options)), clock,
                         InMemoryObjectStore(), prefer=lambda request: "gpu-a@host")
    assert sent == [("gen.full", {"queue": "gen.at.gpu-a@host"})]
    assert outcome["worker"] == "gpu-a@host"
    record = jobs.get("job-1")
    assert record.route == "gen.full" and record.extra["affinity"] == "gpu-a@host"


def test_triage_skips_a_job_a_gpu_worker_already_holds_or_that_finished(clock):
    for state in (JobState.GENERATING, JobState.SUCCEEDED, JobState.CANCELLED):
        jobs, sent = InMemoryJobStore(), []
        job(jobs, state)
        outcome = triage_job("job-1", jobs, RequestLimits(), planned,
                             lambda task, job_id, sent=sent: sent.append(task), clock,
                             InMemoryObjectStore())
        assert outcome["skipped"] == str(state) and sent == []


class WordsEmbedder:
    """A deterministic stand-in for MiniLM: one prompt, one unit vector (no weights to load)."""

    name = "words"

    def embed(self, texts: list[str]) -> np.ndarray:
        vectors = [np.random.default_rng(list(text.encode())).normal(size=16) for text in texts]
        return np.stack([v / np.linalg.norm(v) for v in vectors]).astype(np.float32)


class InMemoryVectors:
    """Exact cosine search per partition, standing in for Chroma."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[np.ndarray, str]] = {}

    def add(self, entry, embedding, partition, prompt, created) -> None:
        self.rows[entry] = (embedding, partition)

    def nearest(self, embedding, partition, n):
        found = [(entry, float(vector @ embedding)) for entry, (vector, part) in self.rows.items()
                 if part == partition]
        return sorted(found, key=lambda match: -match[1])[:n]


class Stack:
    """Triage, GPU worker and registration wired to one set of in-memory stores, as the
    Celery tasks wire them to Redis, S3 and Chroma."""

    def __init__(self, engine: Engine, clock: Clock) -> None:
        self.engine, self.clock = engine, clock
        self.jobs, self.objects = InMemoryJobStore(), InMemoryObjectStore()
        self.catalog, self.identical = InMemoryCatalog(), InMemoryIdenticalRequests()
        self.vectors, self.embedder = InMemoryVectors(), WordsEmbedder()
        self.sent: list[tuple[str, str]] = []
        self.retriaged: list[str] = []
        self.cache = CacheConfig("tiny", "ddim", False, REFERENCE_TABLE, self.catalog,
                                 self.register, self.identical, self.retriaged.append)
        self.router = CacheRouter(self.embedder, self.vectors, self.catalog, self.identical,
                                  self.objects, self.jobs, REFERENCE_TABLE, AlwaysLookUp(),
                                  "tiny", "ddim", False)

    def register(self, entry: str, partition: str, sizes: dict[int, int]) -> None:
        register_entry(entry, partition, sizes, self.jobs, self.embedder, self.vectors,
                       self.catalog, self.clock)

    def submit(self, job_id: str, request: JobRequest = REQUEST, tenant: str = "acme") -> str:
        self.jobs.create(JobRecord(id=job_id, state=JobState.QUEUED, request=request,
                                   model="tiny", submitted_at=0.0, tenant=tenant))
        return job_id

    def triage(self, job_id: str) -> dict:
        return triage_job(job_id, self.jobs, RequestLimits(), self.router,
                          lambda task, job: self.sent.append((task, job)), self.clock,
                          self.objects)

    def generate(self, job_id: str) -> dict:
        run = generate_resume if self.jobs.get(job_id).route == "gen.resume" else generate_full
        return run(job_id, self.jobs, self.objects, self.engine, "w", self.clock, self.cache,
                   Reliability(sleep=self.clock.sleep))

    def image(self, job_id: str) -> bytes:
        return self.objects.get(self.jobs.get(job_id).image_key)


def counting_unet_calls(engine: Engine) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls: list[int] = []
    return calls, engine.pipe.unet.register_forward_hook(lambda *args: calls.append(1))


def test_three_rerolls_of_a_cached_prompt_give_three_different_images(engine, clock):
    """25 steps: another seed's latent serves K 2 of 50, i.e. 1 of 25 (DEFAULT_SEED_POLICY)."""
    stack = Stack(engine, clock)
    request = replace(REQUEST, steps=25)
    stack.triage(stack.submit("first", request))
    stack.generate("first")
    images = {stack.image("first")}
    for number, seed in enumerate((6, 7, 8)):
        job_id = stack.submit(f"reroll-{number}", replace(request, seed=seed))
        stack.triage(job_id)
        stack.generate(job_id)
        record = stack.jobs.get(job_id)
        assert record.route == "gen.resume" and record.plan.k == 1
        assert record.public()["cache"]["seed_rule"] == "noise swap"
        assert record.extra["unet_calls"] == 25 - 1
        images.add(stack.image(job_id))
    assert len(images) == 4  # each re-roll its own picture, none the cached one


def test_an_identical_request_is_served_by_the_exact_path_with_no_step(engine, clock):
    stack = Stack(engine, clock)
    stack.triage(stack.submit("first"))
    stack.generate("first")
    calls, hook = counting_unet_calls(engine)
    try:
        outcome = stack.triage(stack.submit("again"))
    finally:
        hook.remove()
    record = stack.jobs.get("again")
    assert outcome["exact"] == "first" and calls == [] and stack.sent[-1] == ("gen.full", "first")
    assert record.state is JobState.SUCCEEDED and record.extra["unet_calls"] == 0
    assert record.public()["cache"]["route"] == "exact" and record.image_key == "images/again.png"
    assert stack.image("again") == stack.image("first")
    # Tenant-scoped like the cache: another tenant's identical request generates.
    stack.triage(stack.submit("other", tenant="globex"))
    assert stack.jobs.get("other").route == "gen.full"


def test_two_identical_requests_in_flight_make_one_generation(engine, clock):
    stack = Stack(engine, clock)
    stack.triage(stack.submit("leader"))
    follows = stack.triage(stack.submit("follower"))
    assert follows["follows"] == "leader" and stack.sent == [("gen.full", "leader")]
    assert stack.jobs.get("follower").state is JobState.QUEUED
    calls, hook = counting_unet_calls(engine)
    try:
        stack.generate("leader")
        assert stack.retriaged == ["follower"]  # what the leader's worker sends on
        stack.triage("follower")
    finally:
        hook.remove()
    assert len(calls) == STEPS  # one generation for both
    assert stack.jobs.get("follower").state is JobState.SUCCEEDED
    assert stack.image("follower") == stack.image("leader")


def test_a_follower_generates_itself_when_the_shared_generation_is_cancelled(engine, clock):
    stack = Stack(engine, clock)
    stack.triage(stack.submit("leader"))
    stack.triage(stack.submit("follower"))
    stack.jobs.request_cancel("leader", clock())  # queued: cancelled at once
    assert stack.generate("leader")["skipped"] and stack.retriaged == ["follower"]
    stack.triage("follower")
    assert stack.sent[-1] == ("gen.full", "follower")  # it leads now
    stack.generate("follower")
    assert stack.jobs.get("follower").state is JobState.SUCCEEDED


def test_a_follower_generates_itself_when_the_shared_generation_stops_midway(engine, clock):
    class CancelAtStep3(InMemoryJobStore):
        def report_progress(self, job_id: str, step: int, total: int,
                            progress_webhook: bool = False) -> bool:
            if job_id == "leader" and step == 3:
                self.request_cancel(job_id, clock())
            return super().report_progress(job_id, step, total)

    stack = Stack(engine, clock)
    stack.jobs = stack.router.jobs = CancelAtStep3()
    stack.triage(stack.submit("leader"))
    stack.triage(stack.submit("follower"))
    assert stack.generate("leader")["state"] == "cancelled" and stack.retriaged == ["follower"]
    stack.triage("follower")
    assert stack.sent[-1] == ("gen.full", "follower")


def test_a_job_waiting_for_a_batch_stays_queued_uncounted_and_can_be_cancelled(engine, clock):
    """Batch capacity 1: the second job waits in the batcher while the first runs. It is
    still QUEUED with no delivery counted (a worker death now would not make it a suspect
    poison job), and a cancel then stops it before it runs a step."""
    from concurrent.futures import ThreadPoolExecutor

    from workers.batcher import BatchingEngine

    jobs, objects = InMemoryJobStore(), InMemoryObjectStore()
    for job_id in ("running", "waiting"):
        jobs.create(JobRecord(id=job_id, state=JobState.QUEUED, request=REQUEST, model="tiny",
                              submitted_at=0.0))
    batching = BatchingEngine(engine, capacity=1)
    seen: dict[str, object] = {}
    original = jobs.report_progress

    def report_and_look(job_id: str, step: int, total: int, progress_webhook: bool = False) -> bool:
        if job_id == "running" and step == 3:   # the other job waits by now
            while batching._inbox.qsize() == 0 and not seen:
                threading.Event().wait(0.01)
            waiting = jobs.get("waiting")
            seen["waiting"] = (waiting.state, waiting.deliveries)
            jobs.request_cancel("waiting", clock())
        return original(job_id, step, total)

    jobs.report_progress = report_and_look  # type: ignore[method-assign]
    calls, hook = counting_unet_calls(engine)
    try:
        with ThreadPoolExecutor(2) as threads:
            running = threads.submit(generate_full, "running", jobs, objects, batching, "w",
                                     clock, None, Reliability(sleep=clock.sleep))
            threading.Event().wait(0.2)
            waiting = threads.submit(generate_full, "waiting", jobs, objects, batching, "w",
                                     clock, None, Reliability(sleep=clock.sleep))
            outcomes = running.result(timeout=60), waiting.result(timeout=60)
    finally:
        hook.remove()
        batching.close()
    assert seen["waiting"] == (JobState.QUEUED, 0)
    assert outcomes[0]["state"] == "succeeded" and outcomes[1]["state"] == "cancelled"
    assert jobs.get("waiting").state is JobState.CANCELLED and jobs.get("waiting").deliveries == 0
    assert len(calls) == STEPS   # the cancelled job ran none


def test_after_a_failed_progress_report_steps_go_unreported_for_a_pause_then_report_again(
        ) -> None:
    """A Redis that does not answer costs one timeout per pause, not one per step of every
    job in a batch; once it answers, progress (and cancels) are seen again."""
    from core.errors import BrokerUnavailable, JobCancelled
    from workers.generation import REPORT_PAUSE_S, step_reporter

    class FlakyJobs:
        def __init__(self) -> None:
            self.down, self.calls, self.cancel = True, [], False

        def report_progress(self, job_id: str, step: int, total: int,
                            progress_webhook: bool = False) -> bool:
            self.calls.append(step)
            if self.down:
                raise BrokerUnavailable("Redis unreachable")
            return self.cancel

    clock = [0.0]
    jobs = FlakyJobs()
    on_step = step_reporter("job", jobs, now=lambda: clock[0])  # type: ignore[arg-type]
    for step in range(1, 6):  # all within the pause after step 1's failure
        on_step(step, 10)
        clock[0] += REPORT_PAUSE_S / 10
    assert jobs.calls == [1]
    jobs.down = False
    clock[0] += REPORT_PAUSE_S
    on_step(6, 10)
    assert jobs.calls == [1, 6]
    jobs.cancel = True
    with pytest.raises(JobCancelled):
        on_step(7, 10)

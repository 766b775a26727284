"""Faults against real processes: workers killed mid-job, a poison job, Redis restarted, the
object store and the vector index down. The module runs its own stack (persistent Redis,
S3, a Chroma server, a triage/cache worker and a GPU worker) so it can break pieces of it
without disturbing other tests. Nothing here is mocked. Every test runs twice: with a GPU
worker that runs one job per pool process, and with one that batches (T2I_GPU_BATCH=4, a
threads pool), where the process generating a job is the whole worker."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench import load
from bench.addons import random_lora
from cachemgr.vectors import VectorIndex
from core.addons import targets_key
from core.errors import BrokerUnavailable
from core.jobs import JobRecord, JobState, parse_request
from core.jobstore import connect
from core.objectstore import ObjectStore
from core.settings import Settings, api_key_tenants
from infra import servers
from infra.ports import free_port
from producer.client import Client
from workers.app import make_app
from workers.builtin_models import build_tiny_pipeline, cache_embedder
from workers.lora import lora_targets
from workers.reconcile import renew_lease

pytestmark = pytest.mark.faults

TERMINAL = {"succeeded", "failed", "cancelled"}
# Steps of the cache tests: at 25, a repeat with another seed resumes (from K 1, the seed cap).
REUSE_STEPS = 25


class Stack:
    """Services started by name, each stoppable and restartable on its ports and data."""

    def __init__(self, config: Settings, base: Path) -> None:
        self.config, self.base = config, base
        self.processes: dict[str, subprocess.Popen] = {}

    def service(self, name: str) -> servers.Service:
        port = int(self.config.redis_url.rsplit(":", 1)[1].split("/")[0])
        chroma_port = int(self.config.chroma_url.rsplit(":", 1)[1])
        return {
            "redis": lambda: servers.redis(port, self.base / "redis", persistent=True),
            "s3": lambda: servers.s3(self.config, self.base / "s3"),
            "chroma": lambda: servers.chroma(chroma_port, self.base / "chroma"),
            "triage": lambda: servers.cpu_worker("triage-faults", self.config),
            "gpu": lambda: servers.gpu_worker("gpu-faults", self.config),
            "holder": lambda: servers.gpu_worker("gpu-holder", self.config),
            "api": lambda: servers.api(self.config),
            "beat": lambda: servers.beat(self.config, self.base / "beat"),
        }[name]()

    def start(self, name: str) -> None:
        service = self.service(name)
        log_path = self.base / "logs" / f"{name}.log"
        self.processes[name] = servers.start(service, log_path)
        servers.wait_ready(service, self.processes[name], log_path)

    def stop(self, name: str) -> None:
        servers.stop_pid(self.processes.pop(name).pid)

    def stop_all(self) -> None:
        for name in reversed(list(self.processes)):
            self.stop(name)


@pytest.fixture(scope="module", params=[1, 4], ids=["one-job-per-process", "batch-4"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          settings: Settings) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("faults")
    config = dataclasses.replace(
        settings, redis_url=f"redis://127.0.0.1:{free_port()}/0",
        s3_endpoint=f"127.0.0.1:{free_port()}", s3_master_port=free_port(),
        s3_bucket="t2i-faults", chroma_url=f"http://127.0.0.1:{free_port()}",
        state_dir=str(base / "state"), predictor_enabled=False, max_deliveries=2,
        gpu_batch=request.param, torch_threads=1, worker_lease_s=6.0,
        store_outage_s=90.0, visibility_timeout_s=300, api_port=free_port(),
        sweep_grace_s=2.0, redis_outage_s=120.0, reconcile_interval_s=5.0,
        reconcile_quiet_s=20.0, sweep_interval_s=3600.0)
    running = Stack(config, base)
    try:
        for name in ("redis", "s3", "chroma", "triage", "gpu", "api", "beat"):
            running.start(name)
        yield running
    finally:
        running.stop_all()


@pytest.fixture(scope="module")
def client(stack: Stack) -> Client:
    return Client(stack.config)


def wait_until(check, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(BrokerUnavailable):
            value = check()
            if value:
                return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _pid(worker: str) -> int:
    return int(worker.rsplit(" pid ", 1)[1])  # "node@host pid N", set by the GPU task


def worker_pid(client: Client, job_id: str) -> int:
    """The pool process that holds the job (internal: the public view hides it)."""
    return _pid(client.jobs.get(job_id).worker)


def generating_pid(client: Client, job_id: str, min_step: int = 1) -> int | None:
    """The pool process generating the job, once it has made some progress."""
    record = client.jobs.get(job_id)
    if record.state == "generating" and record.step >= min_step and record.worker:
        return _pid(record.worker)
    return None


def kill_generating(stack: Stack, pid: int) -> None:
    """SIGKILL the process generating a job. One job per process: a pool process, whose
    message Celery hands back at once. Batching: the whole worker (its jobs' messages come
    back through the reconciler once its lease lapses), restarted as an orchestrator would."""
    if stack.config.gpu_batch == 1:
        os.kill(pid, signal.SIGKILL)
        return
    worker = stack.processes.pop("gpu")
    assert worker.pid == pid, (worker.pid, pid)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    stack.start("gpu")


def finished(client: Client, job_id: str, timeout: float = 180.0) -> dict:
    return wait_until(lambda: (v := client.status(job_id))["state"] in TERMINAL and v,
                      timeout, f"job {job_id} to finish")


def wait_indexed(stack: Stack, entry: str) -> None:
    """Registration ends with the vector, so a lookup can find the entry from then on."""
    index = VectorIndex.open(None, stack.config.chroma_url,
                             cache_embedder(stack.config.embedder, stack.config.model))
    wait_until(lambda: any(found == entry for _, found in index.ids()), what=f"{entry} indexed")


def keys_of(config: Settings, prefix: str) -> list[str]:
    return list(ObjectStore.from_settings(config).keys(prefix))


def test_the_process_generating_a_job_killed_mid_step_it_is_redelivered_and_succeeds_once(
        stack, client):
    job_id = client.submit("fault test: a lighthouse in a storm", steps=30, seed=3)
    pid = wait_until(lambda: generating_pid(client, job_id, min_step=3), what="generation")
    killed_at = time.monotonic()
    kill_generating(stack, pid)
    view = finished(client, job_id)
    assert time.monotonic() - killed_at < stack.config.visibility_timeout_s
    assert view["state"] == "succeeded", view
    assert client.jobs.get(job_id).deliveries == 2 and worker_pid(client, job_id) != pid
    assert keys_of(stack.config, f"images/{job_id}") == [f"images/{job_id}.png"]
    latents = wait_until(lambda: len(keys_of(stack.config, "cache/")) >= 6 and
                         [k for k in keys_of(stack.config, "cache/") if f"/{job_id}/" in k],
                         what="latents")
    # One per K (3, 6, 9, 12, 15 and the seed cap's 1), overwritten, not duplicated, by the
    # second delivery.
    assert len(latents) == 6


def test_whole_worker_killed_its_jobs_come_back_once_its_lease_lapses(stack, client):
    """The machine dies: no process is left to hand the messages back. The worker's lease
    lapses (T2I_WORKER_LEASE_S, 6 s here) and the reconciler hands back the messages it
    held (batching: both jobs; one job per process: the one it ran, the other still waits
    in the queue), long before Redis would (T2I_VISIBILITY_TIMEOUT_S, 300 s here)."""
    job_ids = [client.submit(f"fault test: a windmill at night {i}", steps=30, seed=11 + i)
               for i in range(2)]
    wait_until(lambda: generating_pid(client, job_ids[0], min_step=3), what="generation")
    worker = stack.processes.pop("gpu")
    os.killpg(worker.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    worker.wait()
    stack.start("gpu")
    views = [finished(client, job_id) for job_id in job_ids]
    assert [view["state"] for view in views] == ["succeeded"] * 2, views
    assert client.jobs.get(job_ids[0]).deliveries == 2
    assert time.monotonic() - killed_at < stack.config.visibility_timeout_s / 3


def test_jobs_waiting_in_a_dead_workers_own_queue_go_on_to_the_shared_queue(stack, client):
    """Affinity (core.affinity): triage sends a LoRA job to the worker that holds the LoRA, in
    that worker's own queue; the worker hangs (takes nothing, though its lease is renewed
    until the job is routed there) and is then killed. Once its lease has lapsed on two
    looks, the reconciler sends the job to the shared queue, where the other worker runs
    it: no job waits for a dead worker."""
    broker = connect(stack.config.broker)
    wait_until(lambda: client.objects.exists(targets_key(stack.config.model)),
               what="a GPU worker to publish the layers a LoRA may adapt")
    digest = client.upload_lora("faults-style", random_lora(
        lora_targets(build_tiny_pipeline().unet), rank=4, seed=3, std=0.5))["digest"]
    lora = [{"name": "faults-style"}]
    routed = threading.Event()
    stack.stop("gpu")
    stack.start("holder")
    try:
        first = client.submit("fault test: a kite over the sea", steps=8, seed=1, loras=lora)
        assert finished(client, first)["state"] == "succeeded"
        holder = client.jobs.get(first).worker.split()[0]
        wait_until(lambda: digest in (broker.get(f"t2i:worker-adapters:{holder}") or ""),
                   what="the holder to say it holds the LoRA")
        group = stack.processes["holder"].pid
        os.killpg(group, signal.SIGSTOP)

        def renew_until_routed() -> None:  # as its lease thread would, were it not frozen
            while not routed.is_set():
                renew_lease(broker, holder, set(), stack.config.worker_lease_s)
                routed.wait(1.0)

        threading.Thread(target=renew_until_routed, daemon=True).start()
        time.sleep(3)  # its last blocking pop (1 s) times out on the server, taking nothing
        waiting = client.submit("fault test: a kite in the rain", steps=8, seed=2, loras=lora)
        wait_until(lambda: client.jobs.get(waiting).route, what="triage")
        routed.set()
        assert client.jobs.get(waiting).extra.get("affinity") == holder
        assert broker.llen(f"gen.at.{holder}") == 1
        os.killpg(group, signal.SIGKILL)
        stack.processes.pop("holder").wait()
    finally:
        routed.set()
        with contextlib.suppress(KeyError, ProcessLookupError):
            os.killpg(stack.processes.pop("holder").pid, signal.SIGKILL)
        stack.start("gpu")
    view = finished(client, waiting)
    assert view["state"] == "succeeded", view
    assert client.jobs.get(waiting).worker.split()[0] != holder
    assert not broker.exists(f"gen.at.{holder}")


def test_poison_job_fails_after_bounded_deliveries_and_the_queue_moves_on(stack, client):
    poison = client.submit("fault test: a job that kills its worker", steps=30, seed=4)
    killed: list[int] = []

    def kill_whoever_generates_it() -> None:
        while client.status(poison)["state"] not in TERMINAL:
            pid = generating_pid(client, poison)
            if pid and pid not in killed:
                killed.append(pid)
                kill_generating(stack, pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_whoever_generates_it, daemon=True)
    killer.start()
    view = finished(client, poison)
    killer.join(10)
    assert view["state"] == "failed" and "worker died during each of 2 deliveries" in view["error"]
    assert len(killed) == stack.config.max_deliveries
    after = client.submit("fault test: an ordinary job after the poison one", steps=5)
    assert finished(client, after)["state"] == "succeeded"


def test_redis_restart_loses_no_accepted_job_and_producers_get_an_error_meanwhile(stack, client):
    accepted = [client.submit(f"fault test: redis restart job {i}", steps=20, seed=i)
                for i in range(3)]
    wait_until(lambda: generating_pid(client, accepted[0]), what="the first job to run")
    stack.stop("redis")  # SIGTERM: with the append-only file, Redis saves what it acknowledged
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        client.submit("fault test: submitted while redis is down")
    assert time.monotonic() - started < 10, "a producer must get an error, not hang"
    stack.start("redis")
    outcomes = {job_id: finished(client, job_id, timeout=240) for job_id in accepted}
    for view in outcomes.values():
        assert view["state"] == "succeeded" or view["error"], view
    assert sum(v["state"] == "succeeded" for v in outcomes.values()) >= 2, outcomes
    assert finished(client, client.submit("fault test: after the restart", steps=5))["state"] \
        == "succeeded"


def test_a_60_s_redis_outage_strands_no_job(stack, client):
    """Redis killed for 60 s while one job is generating, others wait in the queue and one
    sits in triage with no message left (as a lost one leaves it): the generating job's
    worker waits for Redis (T2I_REDIS_OUTAGE_S) and finishes, the queued ones run after,
    and the reconciler re-sends the one nothing holds (T2I_RECONCILE_QUIET_S). All end."""
    generating = client.submit("fault test: outage, generating", steps=30, seed=21)
    queued = [client.submit(f"fault test: outage, queued {i}", steps=5, seed=i) for i in range(3)]
    lost = uuid.uuid4().hex
    client.jobs.create(JobRecord(
        id=lost, state=JobState.TRIAGE, request=parse_request(
            {"prompt": "fault test: outage, lost in triage", "steps": 5}, client.limits, 1),
        model=stack.config.model, submitted_at=time.time(), tenant="default"))
    wait_until(lambda: generating_pid(client, generating, min_step=3), what="generation")
    api = f"http://{stack.config.api_host}:{stack.config.api_port}"
    os.killpg(stack.processes.pop("redis").pid, signal.SIGKILL)
    down_at = time.monotonic()
    time.sleep(5)
    live = httpx.get(f"{api}/livez", timeout=5)
    ready = httpx.get(f"{api}/readyz", timeout=5)
    assert live.status_code == 200 and ready.status_code == 503, (live.text, ready.text)
    time.sleep(max(0.0, 60 - (time.monotonic() - down_at)))
    stack.start("redis")
    outcomes = {job_id: finished(client, job_id, timeout=300)
                for job_id in (generating, *queued, lost)}
    assert {view["state"] for view in outcomes.values()} == {"succeeded"}, outcomes
    assert client.jobs.get(lost).requeues == 1
    assert client.jobs.get(generating).deliveries == 1  # its worker waited, nothing re-ran it


def test_healthz_answers_within_seconds_while_the_object_store_is_frozen(stack):
    """S3 stopped with SIGSTOP: connections are accepted and never answered. Readiness says
    so within seconds (its deadline is 1.5 s), not the client's 30; liveness does not look at
    stores at all."""
    api = f"http://{stack.config.api_host}:{stack.config.api_port}"
    frozen = stack.processes["s3"].pid
    os.killpg(frozen, signal.SIGSTOP)
    try:
        for path in ("/healthz", "/readyz"):
            started = time.monotonic()
            response = httpx.get(api + path, timeout=30)
            # its deadline is 1.5 s; a hang would be the client's 30 s (the slack: a loaded
            # 2-core machine running the whole suite once took 3.0 s)
            assert time.monotonic() - started < 5, path
            assert response.status_code == 503 and response.json()["checks"]["redis"] == "ok"
            assert "no answer" in response.json()["checks"]["s3"], response.text
        started = time.monotonic()
        assert httpx.get(api + "/livez", timeout=30).status_code == 200
        assert time.monotonic() - started < 0.5
    finally:
        os.killpg(frozen, signal.SIGCONT)
    assert httpx.get(api + "/readyz", timeout=30).status_code == 200


def test_object_store_outage_jobs_wait_for_it_and_caching_resumes(stack, client):
    prompt = "fault test: a red bicycle leaning on a blue wall"
    stack.stop("s3")
    job_id = client.submit(prompt, steps=REUSE_STEPS, seed=5)
    wait_until(lambda: client.status(job_id)["progress"]["step"] == REUSE_STEPS,
               what="generation end")
    time.sleep(2)  # the worker is now retrying the image upload
    assert client.status(job_id)["state"] == "generating"
    stack.start("s3")
    view = finished(client, job_id)
    assert view["state"] == "succeeded" and view["timings"]["waited_for_object_store_s"] > 0, view
    wait_indexed(stack, job_id)
    again = finished(client, client.submit(prompt, steps=REUSE_STEPS, seed=6))
    assert again["state"] == "succeeded" and again["cache"]["route"] == "resume", again


def test_vector_index_down_routes_to_full_generation_and_recovers(stack, client):
    prompt = "fault test: a paper boat on a puddle"
    first = finished(client, client.submit(prompt, steps=REUSE_STEPS, seed=7))
    wait_indexed(stack, first["id"])
    stack.stop("chroma")
    down = finished(client, client.submit(prompt, steps=REUSE_STEPS, seed=8))
    assert down["state"] == "succeeded" and down["cache"]["reason"] == "index unavailable", down
    stack.start("chroma")
    back = finished(client, client.submit(prompt, steps=REUSE_STEPS, seed=9))
    assert back["state"] == "succeeded" and back["cache"]["route"] == "resume", back


def test_a_wiped_vector_index_is_rebuilt_from_the_catalog_by_the_sweep(stack, client):
    prompt = "fault test: a glass jar of fireflies"
    first = finished(client, client.submit(prompt, steps=REUSE_STEPS, seed=12))
    wait_indexed(stack, first["id"])
    stack.stop("chroma")
    shutil.rmtree(stack.base / "chroma")  # the index is lost; the catalog is not
    stack.start("chroma")
    lost = finished(client, client.submit(prompt, steps=REUSE_STEPS, seed=13))
    # the worker's collection handle is stale at first (index unavailable), then made anew
    assert lost["state"] == "succeeded", lost
    assert lost["cache"]["reason"] in ("miss", "index unavailable"), lost
    time.sleep(stack.config.sweep_grace_s)
    report = make_app(stack.config).send_task("cache.sweep").get(timeout=120)
    assert report["reindexed"] >= 1, report
    back = finished(client, client.submit(prompt, steps=REUSE_STEPS, seed=14))
    assert back["cache"]["route"] == "resume"
    assert client.jobs.get(back["id"]).plan.entry in (first["id"], lost["id"])


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_burst_of_2000_submissions_loses_no_job_and_keeps_the_api_small(stack):
    """Four producers submit 2,000 jobs through the HTTP API at once; the API's memory stays
    bounded. Then every job is cancelled (one CPU-bound GPU worker here would need most of
    an hour to generate them all) and each must end succeeded, failed with a reason, or
    cancelled: none lost, none stuck."""
    url = f"http://{stack.config.api_host}:{stack.config.api_port}"
    key = api_key_tenants(stack.config).popitem()[0]
    api_pid = stack.processes["api"].pid
    warm = load.burst(url, key, 200, producers=4)
    warm_mb = resident_mb(api_pid)
    report = load.burst(url, key, 2000, producers=4)
    grown_mb = resident_mb(api_pid) - warm_mb
    print(f"accepted {report.accepted} in {report.seconds:.1f}s: {report.accepted_per_s:.0f}/s; "
          f"API resident memory grew {grown_mb:.1f} MB")
    assert report.accepted == 2000 and not report.refused
    assert grown_mb < 100, f"the API grew by {grown_mb:.0f} MB over 2000 submissions"
    everything = warm.job_ids + report.job_ids
    load.cancel_all(url, key, everything, producers=4)
    outcomes = load.follow(url, key, everything, timeout_s=300)
    print(f"outcomes: {dict(outcomes)}")
    assert outcomes["succeeded"] + outcomes["cancelled"] == 2200, outcomes
    assert outcomes["cancelled"] > 0 and not outcomes["lost"] and not outcomes["unfinished"]

"""The Redis job store and the S3 object store against real servers."""

from __future__ import annotations

import threading
import urllib.request

import pytest

from core.errors import (
    BrokerUnavailable,
    IdempotencyConflict,
    JobNotFound,
    ObjectMissing,
    ObjectStoreUnavailable,
)
from core.jobs import JobRecord, JobRequest, JobState
from core.jobstore import WEBHOOK_OUTBOX, JobStore, connect
from core.objectstore import ObjectStore
from infra.ports import free_port
from workers.webhooks import WebhookOutbox

REQUEST = JobRequest(prompt="a cat", negative_prompt="", steps=10, guidance=7.5, seed=1,
                     width=64, height=64)


@pytest.fixture()
def jobs(redis_url: str) -> JobStore:
    return JobStore(connect(redis_url), ttl_s=60)


def new_record(jobs: JobStore, job_id: str, state: JobState = JobState.QUEUED) -> JobRecord:
    record = JobRecord(id=job_id, state=state, request=REQUEST, model="tiny", submitted_at=1.0)
    jobs.create(record)
    return record


def run_concurrently(target, count: int) -> list:
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(target())) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_create_get_and_expiry(jobs: JobStore, redis_url: str):
    record = new_record(jobs, "store-1")
    assert jobs.get("store-1") == record
    assert 0 < connect(redis_url).ttl(JobStore.key("store-1")) <= 60


def test_missing_job_raises_job_not_found(jobs: JobStore):
    with pytest.raises(JobNotFound, match="no job 'nope'"):
        jobs.get("nope")


def test_concurrent_updates_are_not_lost(jobs: JobStore):
    new_record(jobs, "store-2", JobState.GENERATING)

    def bump() -> None:
        for _ in range(50):
            jobs.update("store-2", lambda r: r.transition(r.state, deliveries=r.deliveries + 1))

    run_concurrently(bump, 4)
    assert jobs.get("store-2").deliveries == 200


def test_concurrent_creates_with_one_idempotency_key_make_one_job(jobs: JobStore):
    counter = iter(range(100))
    ids = run_concurrently(lambda: jobs.create(
        JobRecord(id=f"idem-{next(counter)}", state=JobState.QUEUED, request=REQUEST,
                  model="tiny", submitted_at=1.0),
        idempotency=("tenant:key-1", "fingerprint-a")), 8)
    assert len(set(ids)) == 1
    assert jobs.get(ids[0]).request == REQUEST
    with pytest.raises(IdempotencyConflict, match="'key-1' was used for job " + ids[0]):
        jobs.create(JobRecord(id="idem-other", state=JobState.QUEUED, request=REQUEST,
                              model="tiny", submitted_at=1.0),
                    idempotency=("tenant:key-1", "fingerprint-b"))
    with pytest.raises(JobNotFound):
        jobs.get("idem-other")


def test_duplicate_webhook_messages_claim_each_delivery_once(redis_url: str):
    """Eight messages for each of 20 deliveries (a re-sent one, a retry racing the sweep)
    handled at once: each delivery is claimed by one of them."""
    outbox = WebhookOutbox(connect(redis_url))
    connect(redis_url).delete(WEBHOOK_OUTBOX)
    for index in range(20):
        connect(redis_url).zadd(WEBHOOK_OUTBOX, {f"hook-{index}": 0})
    for index in range(20):
        won = run_concurrently(lambda job_id=f"hook-{index}": outbox.claim(
            job_id, now=10.0, lease_s=60.0), 8)
        assert won.count(True) == 1, index
    assert not outbox.claim("hook-0", now=60.0, lease_s=60.0)   # leased until 70
    assert outbox.claim("hook-0", now=70.0, lease_s=60.0)       # a crashed attempt's comes back
    assert not outbox.claim("never-queued", now=70.0, lease_s=60.0)


def test_cancel_queued_job_is_immediate(jobs: JobStore):
    new_record(jobs, "store-3")
    cancelled = jobs.request_cancel("store-3", now=5.0)
    assert cancelled.state is JobState.CANCELLED and cancelled.finished_at == 5.0


def test_cancel_generating_job_is_seen_at_next_step(jobs: JobStore):
    new_record(jobs, "store-4", JobState.GENERATING)
    assert jobs.report_progress("store-4", 1, 10) is False
    assert jobs.request_cancel("store-4", now=5.0).state is JobState.GENERATING
    assert jobs.report_progress("store-4", 2, 10) is True
    assert jobs.get("store-4").step == 2


def test_cancel_finished_job_changes_nothing(jobs: JobStore):
    new_record(jobs, "store-5", JobState.SUCCEEDED)
    assert jobs.request_cancel("store-5", now=5.0) == jobs.get("store-5")
    assert not jobs.get("store-5").cancel_requested


def test_a_tenants_jobs_list_newest_first_by_page_and_forget_expired_records(redis_url: str):
    import uuid

    clock = [10_000.0]
    jobs = JobStore(connect(redis_url), ttl_s=60, now=lambda: clock[0])
    tenant = f"lister-{uuid.uuid4().hex[:8]}"
    for index, at in enumerate((9_000.0, 9_990.0, 9_991.0, 9_992.0)):
        jobs.create(JobRecord(id=f"{tenant}-{index}", state=JobState.QUEUED, request=REQUEST,
                              model="tiny", submitted_at=at, tenant=tenant))
    jobs.create(JobRecord(id=f"{tenant}-elsewhere", state=JobState.QUEUED, request=REQUEST,
                          model="tiny", submitted_at=9_995.0, tenant=tenant + "-other"))
    # the oldest is past the records' 60 s life: dropped from the index as it is met
    assert [r.id for r in jobs.tenant_jobs(tenant, 10, None)] == [
        f"{tenant}-3", f"{tenant}-2", f"{tenant}-1"]
    assert [r.id for r in jobs.tenant_jobs(tenant, 1, 9_992.0)] == [f"{tenant}-2"]
    connect(redis_url).delete(jobs.key(f"{tenant}-2"))  # expired in Redis
    assert [r.id for r in jobs.tenant_jobs(tenant, 10, None)] == [f"{tenant}-3", f"{tenant}-1"]


def test_redis_down_raises_broker_unavailable():
    dead = JobStore(connect(f"redis://127.0.0.1:{free_port()}/0"), ttl_s=60)
    with pytest.raises(BrokerUnavailable, match="Redis unreachable"):
        dead.get("anything")


@pytest.fixture()
def objects(s3_server) -> ObjectStore:
    store = ObjectStore.from_settings(s3_server)
    store.ensure_bucket()
    return store


def test_put_get_list_delete(objects: ObjectStore):
    objects.put("t/a.bin", b"\x00\x01payload")
    assert objects.get("t/a.bin") == b"\x00\x01payload"
    assert objects.exists("t/a.bin") and "t/a.bin" in objects.keys("t/")
    objects.put("t/a.bin", b"second")  # same key overwrites
    assert objects.get("t/a.bin") == b"second" and objects.keys("t/").count("t/a.bin") == 1
    objects.delete("t/a.bin")
    assert not objects.exists("t/a.bin")


def test_missing_object_raises_object_missing(objects: ObjectStore):
    with pytest.raises(ObjectMissing, match="no/such"):
        objects.get("no/such")


def test_presigned_url_serves_the_object(objects: ObjectStore):
    objects.put("t/url.txt", b"hello")
    with urllib.request.urlopen(objects.presigned_url("t/url.txt", ttl_s=60)) as response:
        assert response.read() == b"hello"


def test_presigned_urls_are_signed_for_the_public_address(s3_server, objects: ObjectStore):
    """Browsers reach S3 by another name than the workers do (here `localhost` for
    `127.0.0.1`); the signature covers the host, so the URL is signed for the public one,
    and rewriting the host of an internal URL is refused."""
    import dataclasses
    import urllib.error

    objects.put("t/public.txt", b"for a browser")
    port = s3_server.s3_endpoint.rsplit(":", 1)[1]
    public = ObjectStore.from_settings(dataclasses.replace(
        s3_server, s3_public_url=f"http://localhost:{port}"))
    url = public.presigned_url("t/public.txt", ttl_s=60)
    assert url.startswith(f"http://localhost:{port}/")
    with urllib.request.urlopen(url) as response:
        assert response.read() == b"for a browser"
    rewritten = objects.presigned_url("t/public.txt", ttl_s=60).replace(
        s3_server.s3_endpoint, f"localhost:{port}")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(rewritten)
    assert refused.value.code == 403


def test_wrong_secret_is_refused(s3_server):
    import dataclasses
    wrong = ObjectStore.from_settings(dataclasses.replace(s3_server, s3_secret_key="wrong-secret"))
    with pytest.raises(ObjectStoreUnavailable, match="SignatureDoesNotMatch"):
        wrong.get("t/url.txt")


def test_store_down_raises_object_store_unavailable():
    dead = ObjectStore(f"127.0.0.1:{free_port()}", "k", "secret-key", "bucket")
    with pytest.raises(ObjectStoreUnavailable, match="unreachable"):
        dead.put("x", b"y")

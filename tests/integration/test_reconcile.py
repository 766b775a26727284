"""The reconciler against a real Redis broker: it finds the job ids kombu holds (waiting in
a queue, or delivered and unacknowledged), re-sends or fails only the jobs that no message
holds and nothing touched, and hands back the messages of a worker that died whole."""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
import time

import pytest

from core.affinity import WorkerView
from core.jobs import JobRecord, JobRequest, JobState
from core.jobstore import JobStore, connect
from core.settings import Settings
from workers.app import make_app
from workers.reconcile import (
    broker_job_ids,
    claimed_tags,
    gpu_deliveries,
    publish_worker,
    reconcile,
    renew_lease,
    restore_orphans,
    sweep_own_queues,
    take_own_queue,
    using_own_queue,
    worker_views,
)

REQUEST = JobRequest("a lost lighthouse", "", 5, 7.5, 1, 64, 64)
_ids = itertools.count()


@pytest.fixture
def broker(settings: Settings):
    """A Celery app on a database of its own, so other tests' queues are not read."""
    config = dataclasses.replace(settings, redis_url=settings.redis_url.rsplit("/", 1)[0] + "/5")
    client = connect(config.redis_url)
    client.flushdb()
    yield make_app(config), client
    client.flushdb()


def test_the_broker_holds_jobs_waiting_in_a_queue_and_delivered_unacknowledged(broker):
    app, client = broker
    app.send_task("gen.full", args=["waiting-job"])
    app.send_task("triage.route", args=["in-triage-queue"])
    assert broker_job_ids(client, ["gen.full", "triage"]) == {"waiting-job", "in-triage-queue"}
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue("gen.full")
        message = queue.get(timeout=5)  # delivered, not acknowledged: kombu's unacked hash
        assert client.llen("gen.full") == 0
        assert "waiting-job" in broker_job_ids(client, ["gen.full"])
        message.ack()
        queue.close()
    assert broker_job_ids(client, ["gen.full"]) == set()


def job(jobs: JobStore, state: JobState, **fields) -> str:
    job_id = f"job-{next(_ids)}"
    jobs.create(JobRecord(id=job_id, state=state, request=REQUEST, model="tiny",
                          submitted_at=0.0, **fields))
    return job_id


def test_only_quiet_jobs_no_message_holds_are_resent_or_failed(redis_url):
    clock = [1000.0]
    jobs = JobStore(connect(redis_url), 3600, now=lambda: clock[0])
    routed = job(jobs, JobState.QUEUED, route="gen.resume")
    in_triage = job(jobs, JobState.TRIAGE)
    generating = job(jobs, JobState.GENERATING, route="gen.full")
    held = job(jobs, JobState.QUEUED)
    seen_late = job(jobs, JobState.GENERATING, route="gen.full")
    exhausted = job(jobs, JobState.GENERATING, route="gen.full", requeues=3)
    clock[0] += 10
    fresh = job(jobs, JobState.QUEUED)  # quiet for 0 s only
    looks = [{held}, {held, seen_late}]  # seen_late is on its way to a worker: 2nd look
    sent: list[tuple[str, str]] = []
    report = reconcile(jobs, lambda: looks.pop(0) if looks else {held},
                       lambda task, job_id: sent.append((task, job_id)), lambda: clock[0],
                       quiet_s=5, triage_task="triage.route", max_requeues=3,
                       second_look=lambda: None)
    assert sorted(sent) == sorted([("gen.resume", routed), ("triage.route", in_triage),
                                   ("gen.full", generating)])
    assert report.failed == [exhausted]
    failed = jobs.get(exhausted)
    assert failed.state is JobState.FAILED and "lost 3 times" in failed.error
    assert jobs.get(routed).requeues == 1 and jobs.get(held).requeues == 0
    assert jobs.get(fresh).requeues == 0 and jobs.get(seen_late).requeues == 0
    # re-sent jobs were touched: the next run leaves them alone until they are quiet again
    sent.clear()
    reconcile(jobs, set, lambda task, job_id: sent.append((task, job_id)), lambda: clock[0],
              quiet_s=5, triage_task="triage.route", max_requeues=3, second_look=lambda: None)
    assert {job_id for _, job_id in sent} == {held, seen_late}


DIE_HOLDING = """
import os, sys
from kombu import Connection
with Connection(sys.argv[1]) as connection:
    for queue in sys.argv[2:]:
        message = connection.SimpleQueue(queue).get_nowait()
        print(message.delivery_tag, flush=True)
    os._exit(0)  # dies holding them: nothing hands them back
"""


def test_gpu_messages_of_a_worker_that_died_whole_are_handed_back_live_ones_kept(broker):
    """A worker process takes a GPU message and a triage one and dies without a word; a live
    worker holds another GPU message and names it in its lease. Once a lease's time has
    passed, the reconciler hands back the dead worker's GPU message only (prefork Celery
    hands back triage's when a pool process dies; a whole triage worker's wait for the
    visibility timeout), judged on two looks."""
    app, client = broker
    url = app.conf.broker_url
    for task, job_id in (("gen.full", "orphan-job"), ("gen.full", "live-job"),
                         ("triage.route", "triage-job")):
        app.send_task(task, args=[job_id])
    died = subprocess.run([sys.executable, "-c", DIE_HOLDING, url, "gen.full", "triage"],
                          capture_output=True, text=True, timeout=60, check=True)
    orphan_tag = died.stdout.split()[0]
    with app.connection_for_read() as connection:
        live = connection.SimpleQueue("gen.full").get_nowait()
        assert json.loads(live.body)[0] == ["live-job"]
        live_tag = live.delivery_tag
        renew_lease(client, "gpu-live@host", {live_tag}, lease_s=30)
        assert claimed_tags(client) == {live_tag}
        assert set(gpu_deliveries(client)) == {orphan_tag, live_tag}

        looks: list[str] = []
        with app.connection_for_write() as writer:
            def restore(tag: str) -> None:
                writer.default_channel.qos.restore_by_tag(tag)

            early = restore_orphans(client, restore, time.time, 30, lambda: looks.append("2"))
            assert early == {} and looks == []  # not a lease old yet: nobody judged
            later = lambda: time.time() + 30  # noqa: E731 - a lease's time has passed
            client.delete("t2i:worker-lease:gpu-live@host")  # lost, as in a Redis outage
            restored = restore_orphans(client, restore, later, 30, lambda: (
                looks.append("2"), renew_lease(client, "gpu-live@host", {live_tag}, 30)))
        assert restored == {orphan_tag: "orphan-job"} and looks == ["2"]
        assert broker_job_ids(client, ["gen.full"]) == {"orphan-job", "live-job", "triage-job"}
        assert client.llen("gen.full") == 1 and set(gpu_deliveries(client)) == {live_tag}
        assert "triage-job" in broker_job_ids(client, ["triage"])  # still unacked, untouched
        assert client.llen("triage") == 0
        again = connection.SimpleQueue("gen.full").get_nowait()
        assert json.loads(again.body)[0] == ["orphan-job"] and again.delivery_info["redelivered"]
        again.ack()
        live.ack()


def test_a_lapsed_lease_names_nothing_and_its_node_is_forgotten(broker):
    _, client = broker
    renew_lease(client, "gpu-a@host", {"tag-a"}, lease_s=0.2)
    renew_lease(client, "gpu-b@host", {"tag-b"}, lease_s=30)
    assert claimed_tags(client) == {"tag-a", "tag-b"}
    time.sleep(0.3)
    assert claimed_tags(client) == {"tag-b"}
    assert client.smembers("t2i:worker-leases") == {"gpu-b@host"}


def test_a_workers_own_queue_holds_its_jobs_until_a_lapsed_lease_sends_them_back(broker):
    """Jobs triage sent to a GPU worker's own queue (core.affinity) are held there; once the
    worker's lease lapsed on both looks, the sweep takes the queue whole and re-sends them,
    oldest first, to the shared queue of their task."""
    app, client = broker
    for job_id in ("first-to-a", "second-to-a"):
        using_own_queue(client, "gpu-a@host")
        app.send_task("gen.resume" if job_id == "first-to-a" else "gen.full", args=[job_id],
                      queue="gen.at.gpu-a@host")
    app.send_task("gen.full", args=["shared"])
    renew_lease(client, "gpu-a@host", set(), lease_s=30)
    renew_lease(client, "gpu-b@host", set(), lease_s=30)
    publish_worker(client, "gpu-a@host", ["lora-1", "lora-2"], capacity=4, busy=1)
    assert broker_job_ids(client, ["gen.full"]) == {"first-to-a", "second-to-a", "shared"}
    # a's load counts the jobs in its own queue; b said nothing yet: free, holding nothing
    assert worker_views(client) == [
        WorkerView("gpu-a@host", frozenset({"lora-1", "lora-2"}), 4, 3),
        WorkerView("gpu-b@host", frozenset(), 1, 0)]
    assert sweep_own_queues(client, lambda *sent: pytest.fail("a lives"), lambda: None) == {}

    client.delete("t2i:worker-lease:gpu-a@host")  # a died: its lease lapses
    assert [view.node for view in worker_views(client)] == ["gpu-b@host"]
    assert broker_job_ids(client, ["gen.full"]) == {"first-to-a", "second-to-a", "shared"}
    sent: list[tuple[str, str]] = []
    moved = sweep_own_queues(client, lambda task, job_id: sent.append((task, job_id)),
                             lambda: None)
    assert moved == {"first-to-a": "gpu-a@host", "second-to-a": "gpu-a@host"}
    assert sent == [("gen.resume", "first-to-a"), ("gen.full", "second-to-a")]
    assert not client.exists("gen.at.gpu-a@host")
    assert broker_job_ids(client, ["gen.full"]) == {"shared"}


def test_a_worker_that_renews_between_the_looks_keeps_its_own_queue(broker):
    """A lease lost with Redis (its TTL ran out while Redis was down) is renewed within a
    third of its time: the sweep's second look sees it, and moves nothing."""
    app, client = broker
    using_own_queue(client, "gpu-a@host")
    app.send_task("gen.full", args=["kept"], queue="gen.at.gpu-a@host")
    looks: list[str] = []
    moved = sweep_own_queues(client, lambda *sent: pytest.fail("a renewed"), lambda: (
        looks.append("2"), renew_lease(client, "gpu-a@host", set(), lease_s=30)))
    assert moved == {} and looks == ["2"] and client.llen("gen.at.gpu-a@host") == 1
    assert take_own_queue(client, "gpu-a@host") == [("gen.full", "kept")]  # a stopping
    assert not client.exists("gen.at.gpu-a@host") and broker_job_ids(client, []) == set()


def test_a_message_handed_back_for_a_dead_worker_goes_on_to_the_shared_queue(broker):
    """A worker that died whole held a message from its own queue: it is handed back there,
    and the sweep then re-sends its job to the shared queue."""
    app, client = broker
    using_own_queue(client, "gpu-dead@host")
    app.send_task("gen.full", args=["held-by-dead"], queue="gen.at.gpu-dead@host")
    renew_lease(client, "gpu-dead@host", set(), lease_s=30)
    client.delete("t2i:own-queues")  # swept already; the hand-back must note it again
    died = subprocess.run([sys.executable, "-c", DIE_HOLDING, app.conf.broker_url,
                           "gen.at.gpu-dead@host"],
                          capture_output=True, text=True, timeout=60, check=True)
    tag = died.stdout.split()[0]
    assert gpu_deliveries(client)[tag][1:] == ("held-by-dead", "gen.at.gpu-dead@host")
    client.delete("t2i:worker-lease:gpu-dead@host")
    with app.connection_for_write() as writer:
        restored = restore_orphans(client, writer.default_channel.qos.restore_by_tag,
                                   lambda: time.time() + 30, 30, lambda: None)
    assert restored == {tag: "held-by-dead"} and client.llen("gen.at.gpu-dead@host") == 1
    assert "held-by-dead" in broker_job_ids(client, [])
    sent: list[tuple[str, str]] = []
    sweep_own_queues(client, lambda task, job_id: sent.append((task, job_id)), lambda: None)
    assert sent == [("gen.full", "held-by-dead")] and gpu_deliveries(client) == {}

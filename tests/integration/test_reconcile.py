"""The reconciler against a real Redis broker: it finds the job ids kombu holds (waiting in
a queue, or delivered and unacknowledged), and re-sends or fails only the jobs that no
message holds and nothing touched."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from core.jobs import JobRecord, JobRequest, JobState
from core.jobstore import JobStore, connect
from core.settings import Settings
from workers.app import make_app
from workers.reconcile import broker_job_ids, reconcile

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

"""The embedded vector index's directory removed under running workers (a disk cleaned by
mistake, a volume remounted): jobs keep succeeding, registrations neither fail nor hold up
the shared triage/cache worker, the index reopens itself, and the sweep puts back what the
catalog knows, without restarting anything. Real Redis, S3, Celery workers and Chroma."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import private_workers
from core.settings import Settings
from producer.client import Client
from workers.app import make_app

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def config(s3_server: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with private_workers(s3_server, tmp_path_factory.mktemp("index-removed"), "index",
                         sweep_grace_s=1.0) as config:
        yield config


def run(client: Client, prompt: str, seed: int) -> dict:
    """25 steps: a repeat with another seed resumes (from K 1, the seed cap)."""
    return client.wait(client.submit(prompt, steps=25, seed=seed), timeout=180)


def resumed(view: dict) -> bool:
    return view["cache"]["route"] == "resume"


def hit_once_indexed(client: Client, prompt: str, seed: int, timeout: float = 60) -> dict:
    """Registration runs after the job: repeat the prompt (another seed each time, so not
    an identical request) until it resumes (or time out)."""
    deadline = time.monotonic() + timeout
    while True:
        view = run(client, prompt, seed)
        if resumed(view) or time.monotonic() > deadline:
            return view
        seed += 1


def test_a_removed_index_directory_reopens_and_is_refilled_by_the_sweep(config):
    client = Client(config)
    first = "index fault: a brass lantern on a stone wall"
    assert resumed(hit_once_indexed(client, first, 1))
    shutil.rmtree(config.chroma_dir)

    later = "index fault: a paper crane on a windowsill"
    after = run(client, later, 1)
    assert after["state"] == "succeeded", after
    again = hit_once_indexed(client, later, 2)
    assert resumed(again), again  # registered into the reopened index
    waited = again["timings"]["triage_started_at"] - again["timings"]["submitted_at"]
    assert waited < 3.0, f"triage waited {waited:.1f} s behind registrations"
    assert (Path(config.chroma_dir) / "chroma.sqlite3").exists()

    time.sleep(config.sweep_grace_s)
    report = make_app(config).send_task("cache.sweep").get(timeout=120)
    assert report["reindexed"] >= 1, report
    back = run(client, first, 50)
    assert resumed(back), back

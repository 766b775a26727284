"""A generation that overruns the soft time limit fails its job with that reason, and the
worker goes on to the next job. Own workers (limit 2 s) on their own Redis database, so the
shared test stack keeps its settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from infra import servers
from infra.servers import running
from producer.client import Client

pytestmark = pytest.mark.e2e


def test_soft_time_limit_fails_the_job_and_the_worker_moves_on(s3_server, base_dir: Path):
    config = dataclasses.replace(s3_server, redis_url=s3_server.redis_url.rsplit("/", 1)[0] + "/1",
                                 soft_time_limit_s=2, time_limit_s=60)
    with running(servers.worker("triage-limit", "triage,cache", config),
                 servers.worker("gpu-limit", "gen.full,gen.resume", config),
                 log_dir=base_dir / "logs"):
        client = Client(config)
        slow = client.wait(client.submit("a slow panorama", steps=150, width=128, height=128),
                           timeout=120)
        assert slow["state"] == "failed", slow
        assert slow["error"] == "generation time limit exceeded"
        assert slow["progress"]["step"] < 150  # stopped part way (about 30 s of steps)
        quick = client.wait(client.submit("a quick sketch", steps=2, width=64, height=64),
                            timeout=120)
        assert quick["state"] == "succeeded", quick

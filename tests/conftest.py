"""Fixtures that start real servers and workers on free loopback ports in temporary
directories, using the same definitions as the local stack (infra.servers), and stop them.

Nothing here reads the developer's T2I_* environment: settings start from the defaults.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core.jobstore import KEY_PREFIX, connect
from core.settings import Settings, ensure_secrets, load_settings
from infra import servers
from infra.ports import free_port
from infra.servers import running

# Two tenants of the HTTP API (test keys, not secrets).
TENANT, TENANT_KEY = "acme", "acme-test-key-0123456789"
OTHER, OTHER_KEY = "globex", "globex-test-key-0123456789"
# The loopback ports the test stacks allow webhooks to (T2I_WEBHOOK_ALLOW): a test's own
# receiver listens on one, a receiver that never answers on the other; every other internal
# address stays refused.
WEBHOOK_PORT, SILENT_WEBHOOK_PORT = free_port(), free_port()


@contextlib.contextmanager
def private_workers(settings: Settings, base: Path, name: str,
                    **overrides: object) -> Iterator[Settings]:
    """A triage/cache worker and a GPU worker of their own on a Redis of their own (and an
    embedded vector index), so that no other test's worker takes their tasks."""
    redis_port = free_port()
    config = dataclasses.replace(
        settings, redis_url=f"redis://127.0.0.1:{redis_port}/0", s3_bucket=f"t2i-{name}",
        state_dir=str(base / "state"), chroma_url="", chroma_path="", predictor_enabled=False,
        **overrides)
    with running(servers.redis(redis_port, base / "redis"),
                 servers.cpu_worker(f"triage-{name}", config),
                 servers.gpu_worker(f"gpu-{name}", config), log_dir=base / "logs"):
        yield config


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("t2i")


@pytest.fixture(scope="session")
def redis_url(base_dir: Path) -> Iterator[str]:
    port = free_port()
    with running(servers.redis(port, base_dir / "redis"), log_dir=base_dir / "logs"):
        yield f"redis://127.0.0.1:{port}/0"


@pytest.fixture(scope="session")
def settings(base_dir: Path, redis_url: str) -> Settings:
    """Settings for the test session: its own servers, state dir, small defaults."""
    return ensure_secrets(dataclasses.replace(
        load_settings({}, read_secrets=False), redis_url=redis_url,
        state_dir=str(base_dir / "state"), s3_endpoint=f"127.0.0.1:{free_port()}",
        s3_master_port=free_port(), s3_bucket="t2i-test", api_port=free_port(),
        flower_port=free_port(), default_size=64, default_steps=10, hf_hub_offline=True,
        predictor_enabled=True, api_keys=f"{TENANT}:{TENANT_KEY},{OTHER}:{OTHER_KEY}",
        webhook_allow=f"127.0.0.1:{WEBHOOK_PORT},127.0.0.1:{SILENT_WEBHOOK_PORT}",
        webhook_timeout_s=2.0, api_read_timeout_s=3.0, api_max_connections=200,
        worker_alive_file=str(base_dir / "worker-alive"),
    ))


@pytest.fixture(scope="session")
def s3_server(settings: Settings, base_dir: Path) -> Iterator[Settings]:
    with running(servers.s3(settings, base_dir / "s3"), log_dir=base_dir / "logs"):
        yield settings


@pytest.fixture(scope="session")
def chroma_url(base_dir: Path) -> Iterator[str]:
    port = free_port()
    with running(servers.chroma(port, base_dir / "chroma-server"), log_dir=base_dir / "logs"):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def stack(s3_server: Settings, base_dir: Path) -> Iterator[Settings]:
    """Redis + S3 + a triage worker + a GPU worker (tiny test model, CPU) + a webhook
    worker + the HTTP API."""
    config = s3_server
    with running(servers.cpu_worker("triage-test", config),
                 servers.gpu_worker("gpu-test", config),
                 servers.webhook_worker("webhooks-test", config),
                 servers.api(config), log_dir=base_dir / "logs"):
        yield config


@pytest.fixture(scope="module")
def api(stack: Settings) -> Iterator[httpx.Client]:
    """The HTTP API of ``stack``, as tenant TENANT."""
    with httpx.Client(base_url=f"http://{stack.api_host}:{stack.api_port}", timeout=30,
                      headers={"Authorization": f"Bearer {TENANT_KEY}"}) as http:
        yield http


def job_count(config: Settings) -> int:
    """Job records in Redis: what a refused request must not change."""
    return sum(1 for _ in connect(config.redis_url).scan_iter(f"{KEY_PREFIX}*"))


@pytest.fixture()
def unet_calls(engine) -> Iterator[list[int]]:
    """The UNet calls the test module's ``engine`` makes while the test runs."""
    calls: list[int] = []
    handle = engine.pipe.unet.register_forward_hook(lambda *args: calls.append(1))
    yield calls
    handle.remove()


def finished(http: httpx.Client, job_id: str, timeout: float = 180) -> dict:
    """Poll a job over the API until it succeeded, failed or was cancelled."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = http.get(f"/v1/jobs/{job_id}").json()
        if view["state"] in ("succeeded", "failed", "cancelled"):
            return view
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not finished")

"""The local S3 server (SeaweedFS as t2i-stack and the tests run it) answers only through
the S3 API with keys: its master, filer and volume HTTP ports and its gRPC ports refuse a
local process that has no JWT or certificate. Before, one GET on the master port deleted
every tenant's images and latents."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest

from core.errors import ObjectStoreUnavailable
from core.objectstore import ObjectStore
from core.settings import Settings
from infra.servers import _executable

CANARY = "images/lockdown-canary.png"


@pytest.fixture(scope="module")
def store(s3_server: Settings, base_dir: Path) -> tuple[ObjectStore, dict[str, int], Settings]:
    objects = ObjectStore.from_settings(s3_server)
    objects.ensure_bucket()
    objects.put(CANARY, b"canary", content_type="image/png")
    ports = json.loads((base_dir / "s3" / "ports.json").read_text())
    return objects, ports, s3_server


def answered(method: str, url: str) -> int:
    try:
        return httpx.request(method, url, timeout=5, content=b"x" if method != "GET" else None
                             ).status_code
    except httpx.HTTPError:
        return 0  # reset or closed: refused too


@pytest.mark.parametrize("path", ["/col/delete?collection={bucket}", "/dir/assign",
                                  "/dir/lookup?volumeId=1", "/vol/status", "/vol/grow?count=1",
                                  "/vol/vacuum", "/submit"])
def test_the_master_http_api_answers_no_local_process(store, path):
    objects, ports, config = store
    for method in ("GET", "POST"):
        status = answered(method, f"http://127.0.0.1:{ports['master']}" +
                          path.format(bucket=config.s3_bucket))
        assert not 200 <= status < 300, (method, path, status)
    assert objects.get(CANARY) == b"canary"


@pytest.mark.parametrize("method, path", [
    ("GET", "/buckets/{bucket}/?pretty=y"), ("GET", "/buckets/{bucket}/images/"),
    ("GET", "/buckets/{bucket}/" + CANARY), ("DELETE", "/buckets/{bucket}/" + CANARY),
    ("POST", "/buckets/{bucket}/images/planted.png"), ("DELETE", "/buckets/{bucket}?recursive=true")])
def test_the_filer_http_api_needs_a_jwt(store, method, path):
    objects, ports, config = store
    status = answered(method, f"http://127.0.0.1:{ports['filer']}" +
                      path.format(bucket=config.s3_bucket))
    assert status in (401, 403), (method, path, status)
    assert objects.get(CANARY) == b"canary"
    assert objects.keys("images/planted") == []


def test_volume_writes_need_a_jwt(store):
    _, ports, _ = store
    status = answered("POST", f"http://127.0.0.1:{ports['volume']}/1,0123456789abcdef")
    assert status == 401


def test_grpc_without_the_stacks_certificates_lists_nothing(store, tmp_path):
    """SeaweedFS's own shell, run as another local process would run it."""
    _, ports, config = store
    shell = subprocess.Popen(
        [_executable("weed", ""), "shell", f"-master=127.0.0.1:{ports['master']}."
         f"{ports['master_grpc']}", f"-filer=127.0.0.1:{ports['filer']}.{ports['filer_grpc']}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    try:
        output, _ = shell.communicate(f"fs.ls -l /buckets/{config.s3_bucket}/images\n"
                                      "collection.list\n", timeout=10)
    except subprocess.TimeoutExpired:  # it cannot connect, so it keeps trying
        shell.kill()
        output, _ = shell.communicate()
    assert "lockdown-canary" not in output and "collection:" not in output, output[-500:]


def test_the_s3_api_serves_with_the_keys_and_refuses_without(store):
    objects, _, config = store
    assert objects.get(CANARY) == b"canary"
    stranger = ObjectStore(config.s3_endpoint, config.s3_access_key, "not-the-secret-key",
                           config.s3_bucket, retries=0)
    with pytest.raises(ObjectStoreUnavailable):
        stranger.get(CANARY)

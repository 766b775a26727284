"""Webhooks as an attacker would use them, against the real stack: internal targets in any
spelling are refused at submit (the request that deleted every tenant's data), and
receivers that never answer hold up nobody else's triage."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from conftest import OTHER_KEY, SILENT_WEBHOOK_PORT, TENANT_KEY, job_count
from core.objectstore import ObjectStore

pytestmark = pytest.mark.e2e

SMALL = {"steps": 3, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def base_url(stack) -> str:
    return f"http://{stack.api_host}:{stack.api_port}"


def internal_targets(stack) -> list[str]:
    master = stack.s3_master_port
    return [
        f"http://127.0.0.1:{master}/col/delete?collection={stack.s3_bucket}",  # the attack
        f"http://localhost:{master}/col/delete?collection={stack.s3_bucket}",
        f"http://2130706433:{master}/", f"http://0x7f000001:{master}/", f"http://127.1:{master}/",
        f"http://0177.0.0.1:{master}/", f"http://[::ffff:127.0.0.1]:{master}/",
        f"http://[::ffff:7f00:1]:{master}/", f"http://[::1]:{master}/", f"http://0.0.0.0:{master}/",
        f"http://127.0.0.1:{stack.redis_port}/", f"http://127.0.0.1:{stack.api_port}/v1/jobs",
        "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", "http://192.168.1.1/",
        "http://172.16.0.1/", "http://100.64.0.1/", "http://[fd00::1]/", "http://[fe80::1]/",
        "http://224.0.0.1/", "http://[64:ff9b::7f00:1]/", "http://[2002:7f00:1::]/",
        # a port the allowlist names, on another loopback address
        f"http://127.0.0.2:{SILENT_WEBHOOK_PORT}/"]


def test_internal_webhook_targets_are_refused_at_submit_and_the_data_survives(stack, base_url):
    objects = ObjectStore.from_settings(stack)
    objects.ensure_bucket()
    objects.put("images/ssrf-canary.png", b"still here", content_type="image/png")
    before = job_count(stack)
    with httpx.Client(base_url=base_url, headers={"X-API-Key": TENANT_KEY}, timeout=30) as api:
        for url in internal_targets(stack):
            response = api.post("/v1/jobs", json={"prompt": "a canary", **SMALL,
                                                  "webhook_url": url})
            assert response.status_code == 422, (url, response.text)
            error = response.json()["error"]
            assert error["field"] == "webhook_url" and "refused" in error["message"], url
    assert job_count(stack) == before
    assert objects.get("images/ssrf-canary.png") == b"still here"


class SilentReceiver:
    """Accepts connections on the allowed port and never answers."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", SILENT_WEBHOOK_PORT))
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.connections.append(self.listener.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()
        for connection in self.connections:
            connection.close()


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_receivers_that_never_answer_hold_up_no_other_tenants_triage(stack, base_url):
    """Ten jobs whose receiver never answers: their deliveries run on the webhook worker,
    each cut off at T2I_WEBHOOK_TIMEOUT_S, while another tenant's job is triaged at once."""
    silent = SilentReceiver()
    try:
        with httpx.Client(base_url=base_url, headers={"X-API-Key": TENANT_KEY},
                          timeout=30) as acme, \
                httpx.Client(base_url=base_url, headers={"X-API-Key": OTHER_KEY},
                             timeout=30) as globex:
            hooked = [acme.post("/v1/jobs", json={
                "prompt": f"a silent hook {i}", **SMALL,
                "webhook_url": f"http://127.0.0.1:{SILENT_WEBHOOK_PORT}/hook"}).json()["id"]
                for i in range(10)]
            for job_id in hooked:
                wait_for(lambda job_id=job_id: acme.get(f"/v1/jobs/{job_id}").json()["state"]
                         == "succeeded", 120, f"job {job_id}")
            wait_for(lambda: len(silent.connections) >= 10, 30, "ten deliveries under way")
            other = globex.post("/v1/jobs", json={"prompt": "an unrelated heron",
                                                  **SMALL}).json()["id"]
            view = wait_for(lambda: (v := globex.get(f"/v1/jobs/{other}").json())[
                "timings"]["triage_finished_at"] and v, 30, "the other tenant's triage")
            waited = view["timings"]["triage_finished_at"] - view["timings"]["submitted_at"]
            assert waited < 2.0, f"triage waited {waited:.1f} s behind the webhooks"
            # each delivery was cut off at its deadline (2 s here) and will be retried
            hooks = wait_for(lambda: [h for j in hooked if (h := acme.get(
                f"/v1/jobs/{j}").json().get("webhook"))] if all(acme.get(
                    f"/v1/jobs/{j}").json().get("webhook") for j in hooked) else None,
                30, "the first attempts' outcomes")
            assert {(h["outcome"], h["http_status"]) for h in hooks} == {("unreachable", None)}
    finally:
        silent.close()

"""The local stack command and the CLI, as a user runs them: `t2i-stack up`, `t2i submit
--wait`, `t2i-stack status`, `t2i-stack down`, in a temporary state directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from core.settings import to_environ
from infra import servers
from infra.ports import free_port

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent


def run(command: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / command), *args], env=env, capture_output=True, text=True,
                          timeout=300)


def listening_addresses(session_leaders: list[int]) -> set[str]:
    """host:port of every TCP socket listening in the given processes' sessions (each stack
    service runs in a session of its own), read from /proc."""
    inodes = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            session = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[3])
            if session in session_leaders:
                inodes |= {os.readlink(fd)[8:-1] for fd in (proc / "fd").iterdir()
                           if os.readlink(fd).startswith("socket:[")}
        except OSError:
            continue  # exited meanwhile, or not ours to read
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            columns = line.split()
            if columns[3] == "0A" and columns[9] in inodes:  # 0A: LISTEN
                host, port = columns[1].split(":")
                found.add(f"{_ip(host)}:{int(port, 16)}")
    return found


def _ip(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 16 and raw[:12] == bytes(10) + b"\xff\xff":  # IPv4-mapped IPv6
        raw = raw[12:]
    if len(raw) == 4:
        return ".".join(str(b) for b in raw[::-1])  # little-endian in /proc
    return raw.hex()


def test_stack_up_is_idempotent_serves_a_job_and_down_stops_everything(settings, tmp_path):
    import dataclasses

    config = dataclasses.replace(
        settings, state_dir=str(tmp_path / "state"),
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        s3_endpoint=f"127.0.0.1:{free_port()}", s3_master_port=free_port(),
        api_port=free_port(), flower_port=free_port())
    env = {**os.environ, **to_environ(config)}
    pids: list[int] = []
    try:
        up = run("t2i-stack", "up", env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        for name in ("redis", "s3", "api", "triage", "gpu", "webhooks", "beat", "flower"):
            assert f"{name:8} starting" in up.stdout
        again = run("t2i-stack", "up", env=env)
        assert again.returncode == 0 and again.stdout.count("already running") == 8

        submitted = run("t2i", "submit", "a small boat", "--steps", "4", "--width", "64",
                        "--height", "64", "--wait", "--timeout", "180", env=env)
        assert submitted.returncode == 0, submitted.stderr
        # a progress bar on stderr (steps, state, route), then a short summary on stdout
        assert "succeeded, full" in submitted.stderr and "step" in submitted.stderr
        summary = submitted.stdout.splitlines()
        assert len(summary) == 2 and "succeeded in" in summary[0] and "4/4 steps" in summary[0]
        job_id = summary[0].split()[1]
        assert f"t2i result {job_id}" in summary[1]
        recorded = run("t2i", "wait", job_id, "--json", env=env)
        assert json.loads(recorded.stdout)["state"] == "succeeded"

        bad = run("t2i", "submit", "x", "--width", "65", env=env)
        assert bad.returncode == 2 and "width: 65 is not a multiple of 8" in bad.stderr

        status = run("t2i-stack", "status", env=env)
        assert status.returncode == 0 and f"model    {config.model}, served by" in status.stdout
        other = "scene" if config.model != "scene" else "tiny"
        elsewhere = run("t2i-stack", "status", env={**env, "T2I_MODEL": other})
        assert f"this shell's T2I_MODEL is {other}" in elsewhere.stdout  # a new shell is told
        pids = [json.loads(path.read_text())["pid"]
                for path in (tmp_path / "state" / "pids").glob("*.pid")]
        assert len(pids) == 8
        state = tmp_path / "state"
        assert state.stat().st_mode & 0o777 == 0o700
        loose = [path for path in state.rglob("*")
                 if not path.is_symlink() and path.lstat().st_mode & 0o077]
        # SeaweedFS chmods its volume info files 0644 itself; their folders keep them private
        assert {path.suffix for path in loose} <= {".vif"}, loose
        assert all(path.parent.stat().st_mode & 0o077 == 0 for path in loose), loose

        flower = f"http://127.0.0.1:{config.flower_port}/workers"
        assert httpx.get(flower).status_code == 401
        user, password = config.flower_auth.split(":", 1)
        assert httpx.get(flower, auth=(user, password)).status_code == 200
        listening = listening_addresses(pids)
        assert len(listening) >= 4 and all(a.startswith("127.0.0.1:") for a in listening), listening
    finally:
        down = run("t2i-stack", "down", env=env)
    assert down.returncode == 0 and down.stdout.count("stopped") == 8
    assert not any(servers.is_alive(pid) for pid in pids)
    assert run("t2i-stack", "status", env=env).returncode == 1

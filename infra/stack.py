"""``t2i-stack``: start, report and stop the local stack under one state directory.

Redis, the S3 server (SeaweedFS), the HTTP API, the triage/cache worker, the GPU worker,
the webhook worker, celery beat and Flower, all on 127.0.0.1, each with a log and a PID file under
$T2I_STATE_DIR. ``up`` is idempotent; ``down`` stops only the processes it started.
Chroma runs embedded in the workers (data in $T2I_STATE_DIR/chroma), so it has no process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from core.errors import StackError, T2IError
from core.settings import Settings, ensure_secrets, load_settings
from infra import servers

SERVICES: dict[str, Callable[[Settings], servers.Service]] = {
    "redis": lambda c: servers.redis(c.redis_port, c.state_path / "redis", persistent=True),
    "s3": lambda c: servers.s3(c, c.state_path / "s3"),
    "api": servers.api,
    "triage": lambda c: servers.cpu_worker("triage", c),
    "gpu": lambda c: servers.gpu_worker("gpu", c),
    "webhooks": lambda c: servers.webhook_worker("webhooks", c),
    "beat": lambda c: servers.beat(c, c.state_path),
    "flower": servers.flower,
}


def _pid_file(config: Settings, name: str) -> Path:
    return config.state_path / "pids" / f"{name}.pid"


def _log_file(config: Settings, name: str) -> Path:
    return config.state_path / "logs" / f"{name}.log"


def running_pid(config: Settings, name: str) -> int | None:
    """The PID of our running ``name`` process, checked against its recorded program (a stale
    PID file whose number now belongs to another program does not count; redis-server
    retitles its command line, so only the program name is compared)."""
    path = _pid_file(config, name)
    if not path.exists():
        return None
    recorded = json.loads(path.read_text())
    pid = recorded["pid"]
    try:
        program = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return None
    return pid if Path(recorded["argv"][0]).name in program else None


def ensure_redis_installed() -> None:
    if shutil.which("redis-server"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("redis-server missing: installing it with apt-get ...", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        return
    raise StackError(f"redis-server not found; {servers.REDIS_INSTALL_HINT}")


def up(config: Settings) -> None:
    """Start what is not running; the first start makes the secrets the environment does
    not give (STATE_DIR/secrets)."""
    ensure_redis_installed()
    config = ensure_secrets(config)
    for name, build in SERVICES.items():
        pid = running_pid(config, name)
        if pid:
            print(f"{name:8} already running (pid {pid})", flush=True)
            continue
        service = build(config)
        log_path = _log_file(config, name)
        process = servers.start(service, log_path)
        pid_path = _pid_file(config, name)
        pid_path.parent.mkdir(parents=True, exist_ok=True)
        pid_path.write_text(json.dumps({"pid": process.pid, "argv": service.argv,
                                        "model": config.model}))
        print(f"{name:8} starting (pid {process.pid}) ...", end="", flush=True)
        servers.wait_ready(service, process, log_path)
        print(" ready", flush=True)


def down(config: Settings) -> None:
    for name in reversed(SERVICES):
        pid = running_pid(config, name)
        if pid:
            servers.stop_pid(pid)
            print(f"{name:8} stopped (pid {pid})")
        _pid_file(config, name).unlink(missing_ok=True)


def status(config: Settings) -> bool:
    """Print one line per service; True when all run."""
    endpoints = {
        "redis": config.redis_url, "s3": f"http://{config.s3_endpoint}",
        "api": f"http://{config.api_host}:{config.api_port}",
        "flower": f"http://127.0.0.1:{config.flower_port}",
    }
    all_up = True
    print(f"state directory: {config.state_path}")
    for name in SERVICES:
        pid = running_pid(config, name)
        all_up &= pid is not None
        state = f"up (pid {pid})" if pid else "down"
        print(f"{name:8} {state:18} {endpoints.get(name, ''):28} log {_log_file(config, name)}")
    served = _served_model(config)
    if served:
        print(f"model    {served}, served by the GPU worker" + (
            "" if served == config.model else
            f" (this shell's T2I_MODEL is {config.model}: export T2I_MODEL={served} to match)"))
    return all_up


def _served_model(config: Settings) -> str | None:
    """The model the running GPU worker was started with (its T2I_MODEL then)."""
    if running_pid(config, "gpu") is None:
        return None
    try:
        return str(json.loads(_pid_file(config, "gpu").read_text())["model"])
    except (OSError, ValueError, KeyError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="t2i-stack", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Configuration comes from environment variables: run `t2i config` to list them.")
    parser.add_argument("command", choices=["up", "down", "status", "restart"],
                        help="up: start what is not running; down: stop all; status: report")
    args = parser.parse_args(argv)
    os.umask(0o077)  # PID files, logs and data under the state directory: private
    try:
        config = load_settings()
        if args.command in ("down", "restart"):
            down(config)
        if args.command in ("up", "restart"):
            up(config)
            status(config)
        if args.command == "status":
            return 0 if status(config) else 1
    except T2IError as exc:  # a stack that did not start, or a bad setting
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0

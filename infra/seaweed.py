"""The local S3 server: SeaweedFS as four processes, each allowed only what it needs.

``weed mini`` runs the master, volume server, filer and S3 gateway in one process under one
set of security settings, and then its master (which deletes a whole collection on a GET)
and its filer (which lists and serves every object) answer any process on the machine.
Here each runs apart, and:

- the master's HTTP API (collection delete, volume assign, lookups) is closed by a guard
  whitelist that names no local address; its peers reach it over gRPC;
- the volume server reads and writes only with JWTs the master signs;
- the filer's HTTP API reads and writes only with JWTs the S3 gateway signs;
- every gRPC link uses mutual TLS with the stack's own CA (infra.tls): a process without the
  stack's certificates cannot list, read or delete over gRPC either;

so the S3 API, with its access keys, is the one way to the data. The JWT keys are made
anew at each start and passed in the environment (readable by this user only).

Run by infra.servers.s3 as ``python -m infra.seaweed SPEC.json``; it picks the internal
ports, stops all four when it is stopped, and exits when any of them does, except while
starting: a component that exits then most likely lost a port to another process between
the pick and its bind, so all four start again on other ports (up to ``STARTS`` times).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from infra.ports import free_port

COMPONENTS = ("master", "volume", "filer", "s3", "client")
# A documentation address (RFC 5737): no local process has it, so the master's HTTP admin
# API answers nobody on this machine.
NO_LOCAL_ADDRESS = "192.0.2.1"
INTERNAL_PORTS = ("master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3_grpc")
STARTUP_S = 20.0   # an exit later than this is a failure, not a lost port
STARTS = 3


def _tls_environment(tls: Path) -> dict[str, str]:
    environment = {"WEED_GRPC_CA": str(tls / "ca.crt")}
    for name in COMPONENTS:
        environment[f"WEED_GRPC_{name.upper()}_CERT"] = str(tls / f"{name}.crt")
        environment[f"WEED_GRPC_{name.upper()}_KEY"] = str(tls / f"{name}.key")
    return environment


def pick_ports(spec: dict) -> dict[str, int]:
    """The configured ports (master, s3) with fresh internal ones beside them."""
    avoid = {*spec["avoid"], *spec["ports"].values()}
    return {**spec["ports"], **{name: free_port(avoid) for name in INTERNAL_PORTS}}


def commands(spec: dict, ports: dict[str, int]) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Each component's argv and the environment it adds (beyond the JWT keys inherited)."""
    data, host = Path(spec["dir"]), "127.0.0.1"
    master = f"{host}:{ports['master']}.{ports['master_grpc']}"
    filer = f"{host}:{ports['filer']}.{ports['filer_grpc']}"
    common = [spec["weed"], f"-logdir={data}"]
    bind = [f"-ip={host}", f"-ip.bind={host}"]
    return {
        "master": ([*common, "master", *bind, f"-port={ports['master']}",
                    f"-port.grpc={ports['master_grpc']}", f"-mdir={data / 'master'}",
                    "-telemetry=false", "-volumeSizeLimitMB=128"],
                   {"WEED_GUARD_WHITE_LIST": NO_LOCAL_ADDRESS}),
        "volume": ([*common, "volume", *bind, f"-port={ports['volume']}",
                    f"-port.grpc={ports['volume_grpc']}", f"-dir={data / 'volume'}",
                    f"-master={master}", "-max=0", "-preStopSeconds=1"], {}),
        "filer": ([*common, "filer", *bind, f"-port={ports['filer']}",
                   f"-port.grpc={ports['filer_grpc']}", f"-master={master}",
                   f"-defaultStoreDir={data / 'filer'}",
                   f"-localSocket={data / 'filer.sock'}"], {}),
        "s3": ([*common, "s3", f"-ip.bind={host}", f"-port={ports['s3']}",
                f"-port.grpc={ports['s3_grpc']}", f"-filer={filer}",
                f"-config={spec['identities']}", "-port.iceberg=0", "-port.lance=0"], {}),
    }


def _stop(children: dict[str, subprocess.Popen]) -> None:
    for child in reversed(children.values()):
        child.terminate()
        try:
            child.wait(3)
        except subprocess.TimeoutExpired:  # the filer's graceful stop waits on its own
            child.kill()                   # metadata subscription; its store is a journal
            child.wait()


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    tls = _tls_environment(Path(spec["tls"]))
    for name in ("master", "volume", "filer"):
        (Path(spec["dir"]) / name).mkdir(parents=True, exist_ok=True, mode=0o700)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for start in range(1, STARTS + 1):
        ports = pick_ports(spec)
        (Path(spec["dir"]) / "ports.json").write_text(json.dumps(ports))
        started = time.monotonic()
        # In this process's group: a stop of the group reaches all of them at once.
        children = {name: subprocess.Popen(argv_, env={**os.environ, **tls, **extra})
                    for name, (argv_, extra) in commands(spec, ports).items()}
        while not stopping and all(child.poll() is None for child in children.values()):
            time.sleep(0.2)
        exited = {name: child.returncode for name, child in children.items()
                  if child.poll() is not None}
        _stop(children)
        if stopping:
            return 0
        print(f"seaweed: {', '.join(f'{name} exited with {code}' for name, code in exited.items())};"
              " stopping the rest", file=sys.stderr, flush=True)
        if time.monotonic() - started > STARTUP_S or start == STARTS:
            return 1
        print(f"seaweed: starting again on other ports ({start + 1} of {STARTS})",
              file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

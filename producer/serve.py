"""``t2i-api``: the HTTP API under uvicorn with the limits a public endpoint needs.

uvicorn alone reads a request head of any size with httptools, and keeps a connection that
sends nothing, or half a request, open for ever. Here the h11 parser caps an unfinished
head at ``MAX_HEADER_BYTES``; every request, head and body, must arrive within
``T2I_API_READ_TIMEOUT_S`` of its first byte (a new connection's clock starts at once);
idle keep-alive connections close after ``KEEPALIVE_S``; and connections beyond
``T2I_API_MAX_CONNECTIONS`` are answered 503 and closed. The app refuses heads of too many
headers (431) and caps bodies while they stream (producer.api), so no attack of this kind
grows the process.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from core.errors import SettingError
from core.settings import load_settings, require_secret
from producer.api import MAX_HEADER_BYTES  # an unfinished head larger than this: 400

KEEPALIVE_S = 5.0              # an idle keep-alive connection is closed after this


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a per-request read deadline and a connection bound."""

    read_timeout_s = 10.0
    max_connections = 1000

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._read_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._refuse(503, b"too many connections")
            return
        self._arm()

    def _arm(self) -> None:
        if self._read_deadline is None:
            self._read_deadline = self.loop.call_later(self.read_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def data_received(self, data: bytes) -> None:
        self._arm()  # the next request's first bytes (after a keep-alive pause) start a clock
        super().data_received(data)
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._disarm()  # the whole request is in: the answer may take as long as it takes

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _too_slow(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing():
            return
        begun = self.conn.their_state is h11.SEND_BODY or (
            self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0]))
        if begun and self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self._refuse(408, b"request not received in time")  # it began, but too slowly
        else:
            self.transport.close()  # nothing was sent at all, or an answer is under way

    def _refuse(self, status: int, message: bytes) -> None:
        reason = {408: b"Request Timeout", 503: b"Service Unavailable"}[status]
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\nconnection: close"
                             b"\r\ncontent-length: %d\r\n\r\n%s" % (status, reason,
                                                                    len(message), message))
        self.transport.close()


def guarded_protocol(read_timeout_s: float, max_connections: int) -> type[GuardedH11Protocol]:
    return type("ConfiguredH11Protocol", (GuardedH11Protocol,),
                {"read_timeout_s": read_timeout_s, "max_connections": max_connections})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="t2i-api", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", help="bind address (default: T2I_API_HOST)")
    parser.add_argument("--port", type=int, help="port (default: T2I_API_PORT)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    try:
        config = load_settings()
        require_secret(config, "api_keys")  # no key, no tenant: refuse to serve, saying why
    except SettingError as exc:
        parser.exit(2, f"t2i-api: {exc}\n")
    options: dict[str, Any] = dict(
        http=guarded_protocol(config.api_read_timeout_s, config.api_max_connections),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES, timeout_keep_alive=KEEPALIVE_S,
        backlog=config.api_max_connections, ws="none", lifespan="off",
        log_level=args.log_level)
    uvicorn.run("producer.api:app", host=args.host or config.api_host,
                port=args.port or config.api_port, **options)


if __name__ == "__main__":
    main()

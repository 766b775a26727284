"""Free local ports for the stack's servers, shared by the stack command and the SeaweedFS
supervisor (which picks its internal ports itself, so it can pick again)."""

from __future__ import annotations

import random
import socket
from collections.abc import Collection

from core.errors import StackError

LOOPBACK = "127.0.0.1"
# Below Linux's ephemeral range (32768-60999), so a port handed out here is not taken by an
# outgoing connection before its server binds it; never the same port twice per process.
_PORT_RANGE = (20000, 32000)
_handed_out: set[int] = set()
_ATTEMPTS = 100_000


def free_port(avoid: Collection[int] = ()) -> int:
    """A port nothing listens on now, never handed out before by this process, and not in
    ``avoid`` (ports another process chose for servers that have not bound them yet)."""
    for _ in range(_ATTEMPTS):
        port = random.randrange(*_PORT_RANGE)
        if port in _handed_out or port in avoid:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise StackError(f"no free port found in {_PORT_RANGE[0]}-{_PORT_RANGE[1] - 1} after "
                     f"{_ATTEMPTS} tries")

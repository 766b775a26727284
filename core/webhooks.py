"""Webhook signing and retry schedule. Pure: no network, no clock of its own.

A delivery is a POST of the job's JSON view with the header
``X-T2I-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">``, keyed by the
tenant's signing secret (``GET /v1/webhook-secret``). Receivers recompute it and reject old
timestamps, which stops replays.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlsplit

from core.errors import InvalidRequest

SIGNATURE_HEADER = "X-T2I-Signature"
MAX_URL_CHARS = 2000


def tenant_secret(master: str, tenant: str) -> str:
    """Each tenant's own signing secret, derived from the service's, so one tenant cannot
    forge another's deliveries and nothing per tenant needs storing."""
    return hmac.new(master.encode(), f"webhook:{tenant}".encode(), hashlib.sha256).hexdigest()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def verify(secret: str, header: str, body: bytes, now: float, tolerance_s: float = 300) -> bool:
    """What a receiver does: the signature matches and is recent."""
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    expected = sign(secret, timestamp, body)
    return hmac.compare_digest(expected, header) and abs(now - timestamp) <= tolerance_s


def retry_delay_s(attempt: int, base_s: float = 1.0, cap_s: float = 600.0) -> float:
    """Seconds before retry number ``attempt`` (1, 2, ...): doubling, capped."""
    return min(base_s * 2 ** (attempt - 1), cap_s)


def check_url(url: object) -> str:
    """A webhook URL must be http(s) with a host; raises InvalidRequest naming it."""
    if not isinstance(url, str):
        raise InvalidRequest("webhook_url", f"must be a string, got {type(url).__name__}")
    if len(url) > MAX_URL_CHARS:
        raise InvalidRequest("webhook_url", f"has {len(url)} characters, at most {MAX_URL_CHARS}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest("webhook_url", f"{url!r} is not an http(s) URL with a host")
    return url

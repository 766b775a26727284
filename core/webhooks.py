"""Webhook targets, the address policy, signing and the retry schedule. Pure: no network,
no clock of its own (the resolver and the time are passed in).

A delivery is a POST of the job's JSON view, signed as Standard Webhooks
(standardwebhooks.com) specify, so receivers can use its libraries: ``webhook-id``
(``<job id>.<event>``, and the step for progress: retries keep it, receivers dedupe on
it), ``webhook-timestamp`` (unix seconds) and
``webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">``, keyed by the
tenant's secret (``GET /v1/webhook-secret``, ``whsec_<base64 key>``). Receivers recompute it
and reject old timestamps, which stops replays. The body is ``{"event": "job.<event>",
"job": <the job's view>}`` for the events the job asked for (``Event``).

A tenant names the URL, so a webhook is a request our own worker sends on a stranger's
behalf (SSRF). The same parser (``parse_target``) checks a URL at submit and builds the
request at delivery, and the same policy (``AddressPolicy``) checks every address its host
resolves to, both times: loopback, private, link-local, unique-local, shared, multicast,
reserved and unspecified addresses, in any spelling (IPv4-mapped, 6to4, NAT64, Teredo), are
refused unless an operator allowlists them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

from core.errors import DeliveryFailed, InvalidRequest, WebhookRefused

ID_HEADER, TIMESTAMP_HEADER = "webhook-id", "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
SECRET_PREFIX = "whsec_"
MAX_URL_CHARS = 2000
# RFC 3986's characters, and '%' for escapes: no space, control, quote or non-ASCII
# character reaches the HTTP client (a CR/LF would split the request line).
_URL_CHARACTERS = frozenset(string.ascii_letters + string.digits + "-._~:/?#[]@!$&'()*+,;=%")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolve = Callable[[str, int], list[str]]
"""(host, port) -> the addresses it resolves to; raises OSError when it does not."""

_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: is_private misses it


RETRY_FIRST_S, RETRY_CAP_S = 1.0, 600.0   # a failed delivery is retried after 1, 2, 4 ... s


class Event(StrEnum):
    """What a job's webhook is POSTed for; a job names the ones it wants
    (``webhook_events_filter``, as cog's), ``completed`` alone by default."""

    STARTED = "started"        # a GPU worker began generating it
    PROGRESS = "progress"      # a denoising step finished (coalesced: one pending at a time)
    COMPLETED = "completed"    # it succeeded, failed or was cancelled


DEFAULT_EVENTS = (Event.COMPLETED,)


def parse_events(value: object) -> tuple[Event, ...]:
    """A submission's ``webhook_events_filter``: a non-empty list of event names, each known;
    raises InvalidRequest naming the bad value."""
    known = ", ".join(event.value for event in Event)
    if not isinstance(value, list) or not value:
        raise InvalidRequest("webhook_events_filter", f"must be a non-empty list of events "
                             f"({known}), got {value!r}")
    for name in value:
        if not isinstance(name, str) or name not in {event.value for event in Event}:
            raise InvalidRequest("webhook_events_filter", f"{name!r} is not an event "
                                 f"(choose from {known})")
    return tuple(event for event in Event if event in value)


def delivery_key(job_id: str, event: Event) -> str:
    """The outbox entry (and message) of one event of one job."""
    return f"{job_id}:{event}"


def parse_delivery_key(key: str) -> tuple[str, Event]:
    """(job id, event) of an outbox entry; an entry made before events existed is the job's
    completion."""
    job_id, _, event = key.partition(":")
    return job_id, Event(event) if event else Event.COMPLETED


def message_id(job_id: str, event: Event, step: int) -> str:
    """The ``webhook-id`` receivers dedupe on: retries of one event keep it; each progress
    step has its own."""
    return f"{job_id}.{event}" + (f".{step}" if event is Event.PROGRESS else "")


def tenant_secret(master: str, tenant: str) -> str:
    """Each tenant's own signing secret, derived from the service's, so one tenant cannot
    forge another's deliveries and nothing per tenant needs storing; in Standard Webhooks'
    form (``whsec_`` and the key in base64)."""
    key = hmac.new(master.encode(), f"webhook:{tenant}".encode(), hashlib.sha256).digest()
    return SECRET_PREFIX + base64.b64encode(key).decode()


def signed_headers(secret: str, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers of one delivery of ``body``."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    digest = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return {ID_HEADER: message_id, TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: "v1," + base64.b64encode(digest.digest()).decode()}


def verify(secret: str, headers: Mapping[str, str], body: bytes, now: float,
           tolerance_s: float = 300) -> bool:
    """What a receiver does: one of the offered signatures matches and the timestamp is
    recent."""
    named = {name.lower(): value for name, value in headers.items()}
    try:
        message_id, timestamp = named[ID_HEADER], int(named[TIMESTAMP_HEADER])
    except (KeyError, ValueError):
        return False
    expected = signed_headers(secret, message_id, timestamp, body)[SIGNATURE_HEADER]
    offered = named.get(SIGNATURE_HEADER, "").split()
    return (any(hmac.compare_digest(expected, signature) for signature in offered)
            and abs(now - timestamp) <= tolerance_s)


@dataclass(frozen=True)
class WebhookTarget:
    """A checked webhook URL, in the parts the deliverer sends: it never re-parses the
    tenant's string."""

    scheme: str
    host: str           # lower-case name or IP literal, without brackets
    port: int
    target: str         # path and query, as sent on the request line

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def parse_target(url: object) -> WebhookTarget:
    """A webhook URL must be an absolute http(s) URL with a host, no user info and only
    URL characters; raises InvalidRequest naming ``webhook_url``."""
    if not isinstance(url, str):
        raise InvalidRequest("webhook_url", f"must be a string, got {type(url).__name__}")
    if len(url) > MAX_URL_CHARS:
        raise InvalidRequest("webhook_url", f"has {len(url)} characters, at most {MAX_URL_CHARS}")
    bad = next((c for c in url if c not in _URL_CHARACTERS), None)
    if bad is not None:
        raise InvalidRequest("webhook_url", f"contains {bad!r}, which a URL may not hold "
                                            "unescaped (international names: use punycode)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # a malformed IPv6 host or a port that is not a number
        raise InvalidRequest("webhook_url", f"{url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest("webhook_url", f"{url!r} is not an http(s) URL with a host")
    if parts.username is not None or parts.password is not None:
        raise InvalidRequest("webhook_url", "must not carry user info (user:password@)")
    if port == 0:
        raise InvalidRequest("webhook_url", "port 0 is not a port")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return WebhookTarget(parts.scheme, parts.hostname, port or
                         (443 if parts.scheme == "https" else 80), target)


def _embedded_v4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries and a network may route to."""
    found = [a for a in (address.ipv4_mapped, address.sixtofour) if a is not None]
    if address.teredo is not None:
        found += list(address.teredo)
    if any(address in network for network in _NAT64):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def address_class(address: IPAddress) -> str | None:
    """Why ``address`` is not a public unicast address, or None when it is one."""
    for embedded in _embedded_v4(address) if isinstance(address, ipaddress.IPv6Address) else []:
        reason = address_class(embedded)
        if reason:
            return f"{reason} (inside {address})"
    checks = (("unspecified", address.is_unspecified), ("loopback", address.is_loopback),
              ("link-local", address.is_link_local), ("multicast", address.is_multicast),
              ("site-local", address.version == 6 and address.is_site_local),
              ("reserved", address.is_reserved), ("shared", address in _SHARED
                                                  if address.version == 4 else False),
              ("private", address.is_private), ("not global", not address.is_global))
    return next((name for name, hit in checks if hit), None)


@dataclass(frozen=True)
class AllowRule:
    """An operator's exception: a network, optionally one port of it."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    port: int | None = None

    def allows(self, address: IPAddress, port: int) -> bool:
        return address in self.network and self.port in (None, port)


def parse_allowlist(text: str) -> tuple[AllowRule, ...]:
    """``T2I_WEBHOOK_ALLOW``: comma-separated networks or addresses, each optionally with a
    port (``10.0.0.0/8``, ``127.0.0.1:9000``, ``[fd00::1]:443``); raises ValueError naming
    the bad entry."""
    rules = []
    for entry in filter(None, (item.strip() for item in text.split(","))):
        host, port = entry, None
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            port = rest.removeprefix(":") or None
        elif entry.count(":") == 1:
            host, port = entry.split(":")
        try:
            rules.append(AllowRule(ipaddress.ip_network(host, strict=False),
                                   int(port) if port is not None else None))
        except ValueError:
            raise ValueError(f"T2I_WEBHOOK_ALLOW: {entry!r} is not a network or address with "
                             "an optional port (10.0.0.0/8, 127.0.0.1:9000, [fd00::1]:443)"
                             ) from None
    return tuple(rules)


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses a webhook may be sent to: public unicast ones, and those an allow
    rule names."""

    allow: tuple[AllowRule, ...] = ()

    def refusal(self, address: str, port: int) -> str | None:
        """Why the POST may not go to ``address``:``port``, or None when it may."""
        parsed = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone
        if any(rule.allows(parsed, port) for rule in self.allow):
            return None
        reason = address_class(parsed)
        return f"{address} is {reason}" if reason else None

    def check(self, target: WebhookTarget, resolve: Resolve) -> list[str]:
        """The addresses to connect to, every one allowed; raises WebhookRefused when any
        address the host resolves to is refused (a name that resolves to one public and one
        private address is refused, not tried in turn), DeliveryFailed when it does not
        resolve (which may pass)."""
        try:
            addresses = _unique(resolve(target.host, target.port))
        except OSError as exc:
            raise DeliveryFailed(f"host {target.host!r} does not resolve ({exc})") from None
        if not addresses:
            raise DeliveryFailed(f"host {target.host!r} resolves to no address")
        refusals = list(filter(None, (self.refusal(a, target.port) for a in addresses)))
        if refusals:
            raise WebhookRefused(f"host {target.host!r}: {refusals[0]}")
        return addresses


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


class Outcome(StrEnum):
    """What a tenant may learn of a delivery: coarse on purpose, so that the job record is
    no port scanner (a closed port, a Redis and a TLS error all read ``unreachable``);
    the details go to the operator's log."""

    DELIVERED = "delivered"
    REFUSED = "refused by policy"
    UNREACHABLE = "unreachable"
    HTTP_ERROR = "http error"       # an allowed receiver answered, but not 2xx

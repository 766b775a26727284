"""Job requests (validated up front) and job records (a small state machine). Pure logic."""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from core.addons import ControlRef, LoraRef, parse_loras
from core.errors import InvalidRequest, InvalidTransition
from core.plan import CachePlan, Reason, Route
from core.webhooks import DEFAULT_EVENTS, Event

if TYPE_CHECKING:
    from core.settings import Settings

REQUEST_FIELDS = ("prompt", "negative_prompt", "steps", "guidance", "seed", "width", "height",
                  "loras")
# What a submission may carry: the request, its ControlNet and control image, and where to
# POST the job's events and which (checked by the producer, which hands parse_request the
# rest).
SUBMISSION_FIELDS = (*REQUEST_FIELDS, "controlnet", "webhook_url", "webhook_events_filter")
MIN_SIZE = 64
MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 50.0
_ALLOWED_CONTROL = {"\n", "\t", "\r"}


@dataclass(frozen=True)
class RequestLimits:
    """Defaults and bounds for job parameters (from Settings, injected for testability)."""

    default_steps: int = 50
    max_steps: int = 150
    default_size: int = 512
    max_size: int = 1024
    default_guidance: float = 7.5
    max_prompt_chars: int = 2000

    @classmethod
    def from_settings(cls, config: Settings) -> RequestLimits:
        return cls(default_steps=config.default_steps, max_steps=config.max_steps,
                   default_size=config.default_size, max_size=config.max_size,
                   default_guidance=config.default_guidance,
                   max_prompt_chars=config.max_prompt_chars)


@dataclass(frozen=True)
class JobRequest:
    """A validated text-to-image request. The seed is always fixed, so a redelivered job
    reproduces the same image."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    seed: int
    width: int
    height: int
    loras: tuple[LoraRef, ...] = ()   # adapters applied, in order (core.addons)
    controlnet: ControlRef | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def payload(self) -> dict[str, Any]:
        """The request as a submission gives it (what ``parse_request`` checks again):
        adapters by name and scale, the digests being resolved at submission; its control
        image was checked then and is not part of it."""
        values = {**asdict(self), "loras": [{"name": ref.name, "scale": ref.scale}
                                            for ref in self.loras]}
        del values["controlnet"]
        return values

    @classmethod
    def from_json(cls, text: str) -> JobRequest:
        values = json.loads(text)
        values["loras"] = tuple(LoraRef(**ref) for ref in values.get("loras", ()))
        control = values.get("controlnet")
        values["controlnet"] = ControlRef(**control) if control else None
        return cls(**values)


def _shown(value: Any) -> str:
    """A value as an error message quotes it: numbers of hundreds of digits cut short."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else \
        f"an integer of {len(str(abs(value))) if abs(value) < 10**4000 else 'over 4000'} digits"
    return text if len(text) <= 80 else text[:77] + "..."


def _visible(text: str) -> str:
    """``text`` without whitespace and invisible format characters (zero-width spaces and
    joiners, the byte-order mark): what is left is what a model can be prompted with."""
    return "".join(c for c in text if not c.isspace() and unicodedata.category(c) != "Cf")


def _check_text(name: str, value: Any, max_chars: int, required: bool) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(name, f"must be a string, got {type(value).__name__}")
    if required and not _visible(value):
        raise InvalidRequest(name, "must not be empty, only whitespace or only invisible "
                                   "characters (zero-width spaces, byte-order marks)")
    if len(value) > max_chars:
        raise InvalidRequest(name, f"has {len(value)} characters, at most {max_chars} allowed")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(name, f"is not valid UTF-8 at position {exc.start}") from None
    for index, char in enumerate(value):
        if unicodedata.category(char) == "Cc" and char not in _ALLOWED_CONTROL:
            raise InvalidRequest(name, f"contains control character {char!r} at position {index}")
    return value.strip()


def _check_int(name: str, value: Any, low: int, high: int) -> int:
    # bool is an int subclass; float 50.0 is accepted as 50 only when integral.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(name, f"must be an integer, got {_shown(value)}")
    if isinstance(value, float):
        if not value.is_integer():
            raise InvalidRequest(name, f"must be an integer, got {_shown(value)}")
        value = int(value)
    if not low <= value <= high:
        raise InvalidRequest(name, f"{_shown(value)} is out of range [{low}, {high}]")
    return value


def _check_size(name: str, value: Any, limits: RequestLimits) -> int:
    size = _check_int(name, value, MIN_SIZE, limits.max_size)
    if size % 8:
        raise InvalidRequest(name, f"{size} is not a multiple of 8")
    return size


def _check_guidance(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest("guidance", f"must be a number, got {_shown(value)}")
    # Compared before any float conversion: an integer of 400 digits has no float.
    if not (isinstance(value, int) or math.isfinite(value)) or not 0 <= value <= MAX_GUIDANCE:
        raise InvalidRequest("guidance", f"{_shown(value)} is out of range [0, {MAX_GUIDANCE}]")
    return float(value)


def parse_request(payload: Any, limits: RequestLimits, random_seed: int) -> JobRequest:
    """Validate a raw request (e.g. decoded JSON) into a JobRequest.

    ``random_seed`` is used when the request names no seed; it is passed in so this stays pure.
    Raises InvalidRequest naming the first bad field and value.
    """
    if not isinstance(payload, Mapping):
        raise InvalidRequest("body", f"must be an object, got {type(payload).__name__}")
    unknown = sorted(str(key) for key in payload if key not in REQUEST_FIELDS)
    if unknown:
        raise InvalidRequest(unknown[0], f"unknown field {unknown[0]!r} "
                                         f"(allowed: {', '.join(SUBMISSION_FIELDS)})")
    if "prompt" not in payload:
        raise InvalidRequest("prompt", "is required")

    def given(name: str, default: Any) -> Any:
        value = payload.get(name)
        return default if value is None else value

    return JobRequest(
        prompt=_check_text("prompt", payload["prompt"], limits.max_prompt_chars, required=True),
        negative_prompt=_check_text("negative_prompt", given("negative_prompt", ""),
                                    limits.max_prompt_chars, required=False),
        steps=_check_int("steps", given("steps", limits.default_steps), 1, limits.max_steps),
        guidance=_check_guidance(given("guidance", limits.default_guidance)),
        seed=_check_int("seed", given("seed", random_seed), 0, MAX_SEED),
        width=_check_size("width", given("width", limits.default_size), limits),
        height=_check_size("height", given("height", limits.default_size), limits),
        loras=parse_loras(given("loras", [])),
    )


class JobState(StrEnum):
    QUEUED = "queued"          # waiting for triage, or (route set) for a GPU worker
    TRIAGE = "triage"
    GENERATING = "generating"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

# Self-transitions are redeliveries (a worker died and the message came back) or progress.
ALLOWED_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.TRIAGE, JobState.GENERATING, JobState.FAILED,
                                JobState.CANCELLED}),
    JobState.TRIAGE: frozenset({JobState.TRIAGE, JobState.QUEUED, JobState.FAILED,
                                JobState.CANCELLED,
                                JobState.SUCCEEDED}),  # the exact path: no step to run
    JobState.GENERATING: frozenset({JobState.GENERATING, JobState.SUCCEEDED, JobState.FAILED,
                                    JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


@dataclass(frozen=True)
class JobRecord:
    """A job's record, stored as a flat Redis hash (see to_fields / from_fields); what a
    poller sees of it is ``public()``."""

    id: str
    state: JobState
    request: JobRequest
    model: str
    submitted_at: float
    tenant: str = ""
    route: str = ""              # the generation task (and queue) triage sent it to
    plan: CachePlan | None = None  # triage's cache decision, which the GPU worker follows
    step: int = 0
    total_steps: int = 0
    triage_started_at: float | None = None
    triage_finished_at: float | None = None
    generation_started_at: float | None = None
    generation_finished_at: float | None = None
    finished_at: float | None = None
    image_key: str = ""
    error: str = ""
    cancel_requested: bool = False
    deliveries: int = 0
    requeues: int = 0            # times the reconciler re-sent a message nothing held
    worker: str = ""
    webhook_url: str = ""        # POSTed the job's events (see core.webhooks)
    webhook_events: str = ""     # which, comma-separated ("": completed only)
    # What the stages report (GENERATION_FACTS, TIMING_FACTS, the webhook's outcome):
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def wanted_events(self) -> tuple[Event, ...]:
        """The events its webhook is POSTed for (none without a webhook)."""
        if not self.webhook_url:
            return ()
        return tuple(Event(name) for name in self.webhook_events.split(",")) \
            if self.webhook_events else DEFAULT_EVENTS

    def events_due(self, old: JobRecord) -> list[Event]:
        """The wanted events that the change from ``old`` to this record makes happen
        (progress is reported outside the state machine: JobStore.report_progress)."""
        happened = []
        if self.state is JobState.GENERATING and old.state is not JobState.GENERATING:
            happened.append(Event.STARTED)
        if self.state.terminal and not old.state.terminal:
            happened.append(Event.COMPLETED)
        return [event for event in happened if event in self.wanted_events]

    def transition(self, new_state: JobState, **changes: Any) -> JobRecord:
        """Return the record in ``new_state`` with ``changes`` applied, if the move is allowed."""
        if new_state not in ALLOWED_TRANSITIONS[self.state]:
            raise InvalidTransition(f"job {self.id}: {self.state} -> {new_state} is not allowed")
        return replace(self, state=new_state, **changes)

    def to_fields(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "request":
                out[f.name] = value.to_json()
            elif f.name == "plan":
                out[f.name] = value.to_json() if value else ""
            elif f.name == "extra":
                out[f.name] = json.dumps(value, sort_keys=True)
            elif value is None:
                out[f.name] = ""
            elif isinstance(value, bool):
                out[f.name] = "1" if value else "0"
            else:
                out[f.name] = str(value)
        return out

    @classmethod
    def from_fields(cls, raw: Mapping[str, str]) -> JobRecord:
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in raw:
                continue
            text = raw[f.name]
            if f.name == "request":
                values[f.name] = JobRequest.from_json(text)
            elif f.name == "plan":
                values[f.name] = CachePlan.from_json(text) if text else None
            elif f.name == "extra":
                values[f.name] = json.loads(text) if text else {}
            elif f.name == "state":
                values[f.name] = JobState(text)
            elif f.type == "bool":
                values[f.name] = text == "1"
            elif f.type == "int":
                values[f.name] = int(text)
            elif f.type == "float":
                values[f.name] = float(text)
            elif f.type == "float | None":
                values[f.name] = float(text) if text else None
            else:
                values[f.name] = text
        if "plan" not in raw:
            values["plan"] = _plan_of_older_record(raw, values.get("extra", {}))
        return cls(**values)

    def public(self) -> dict[str, Any]:
        """The JSON view given to pollers: no partition hash, internal entry id, task name or
        delivery bookkeeping. ``cache`` says how the job ran: ``route`` full or resume,
        ``k`` (steps taken from the cache), ``similarity``, ``reason``, and ``fallback``
        when a planned resume ran in full instead."""
        fallback = self.extra.get("fallback")
        cache = None
        if self.plan is not None:
            cache = {**self.plan.public(), "fallback": fallback}
            if fallback:
                cache.update(route=str(Route.FULL), k=None)
        return {
            "id": self.id,
            "tenant": self.tenant,
            "state": str(self.state),
            "request": asdict(self.request),
            "model": self.model,
            "progress": {"step": self.step, "total": self.total_steps},
            "cache": cache,
            "timings": {
                "submitted_at": self.submitted_at,
                "triage_started_at": self.triage_started_at,
                "triage_finished_at": self.triage_finished_at,
                "generation_started_at": self.generation_started_at,
                "generation_finished_at": self.generation_finished_at,
                "finished_at": self.finished_at,
                **{name: self.extra.get(name) for name in TIMING_FACTS},
            },
            "unet_calls": self.extra.get("unet_calls"),
            "shallow_unet_calls": self.extra.get("shallow_unet_calls"),
            "step_cache": self.extra.get("step_cache"),
            "batch_peak": self.extra.get("batch_peak"),
            "error": self.error or None,
            "cancel_requested": self.cancel_requested,
            "webhook_url": self.webhook_url or None,
            "webhook_events_filter": [str(e) for e in self.wanted_events] or None,
            "webhook": self.extra.get("webhook"),
        }


# What the stages put in ``extra``, besides the generation's ``unet_calls``,
# ``shallow_unet_calls``, ``step_cache``, ``batch_peak``, ``resumed_from_k`` and ``fallback``
# and the webhook's outcome: the time each part took.
TIMING_FACTS = ("embed_ms", "lookup_ms", "latent_fetch_ms", "waited_for_object_store_s",
                "adapter_wait_ms")


def _plan_of_older_record(raw: Mapping[str, str], extra: dict[str, Any]) -> CachePlan | None:
    """Records written before plans were typed kept the decision in ``route``,
    ``route_reason`` and ``extra``; they still read."""
    if not raw.get("route"):
        return None
    resume = raw["route"] == "gen.resume"
    reason = raw.get("route_reason", "")
    return CachePlan(
        Route.RESUME if resume else Route.FULL,
        Reason(reason) if reason in set(Reason) else (Reason.HIT if resume else Reason.MISS),
        partition=extra.get("partition", ""), entry=extra.get("matched_entry"),
        k=extra.get("k"), wanted_k=extra.get("wanted_k"), similarity=extra.get("similarity"),
        looked_up="lookup_hit" in extra, predictor=str(extra.get("predictor", "")),
        predicted_hit=extra.get("predicted_hit"), audited=bool(extra.get("predictor_audit")),
        table=extra.get("k_table", ""))


def image_key(job_id: str) -> str:
    """Deterministic object key: a redelivered job overwrites its image, never duplicates it."""
    return f"images/{job_id}.png"

"""Service metrics: which counters a job's state change moves (pure), and how they are named.

Workers run as many prefork processes on many machines, so they do not each serve a
/metrics page: they add to counters in one Redis hash (``MetricsStore``), in the same
transaction as the job-record change that caused them, so a redelivered job is never
counted twice. The API's /metrics reads that hash (``workers`` and ``api`` numbers alike).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from core.jobs import JobRecord, JobState
from core.plan import Route

# Seconds; generation on a GPU takes seconds, on this CPU toy model up to minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0, 300.0, 600.0)
STAGES = ("triage", "wait", "generate", "total")


@dataclass(frozen=True)
class Sample:
    """One addition to a counter. ``labels`` is a sorted tuple of (name, value) pairs."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float

    @property
    def field(self) -> str:
        """Its field in the Redis hash: ``name{a="x",b="y"}`` (the exposition syntax)."""
        return self.name + "{" + ",".join(f'{k}="{v}"' for k, v in self.labels) + "}"


def sample(name: str, value: float = 1.0, **labels: Any) -> Sample:
    return Sample(name, tuple(sorted((k, str(v)) for k, v in labels.items())), value)


def parse_field(text: str) -> tuple[str, dict[str, str]]:
    """Inverse of ``Sample.field``; label values never contain quotes or commas here."""
    name, _, rest = text.partition("{")
    labels = {}
    for pair in filter(None, rest.rstrip("}").split(",")):
        key, _, value = pair.partition("=")
        labels[key] = value.strip('"')
    return name, labels


def histogram(name: str, seconds: float, **labels: Any) -> list[Sample]:
    """The samples one observation adds: its bucket (cumulated at read time), sum, count."""
    index = bisect.bisect_left(LATENCY_BUCKETS, seconds)
    bucket = str(LATENCY_BUCKETS[index]) if index < len(LATENCY_BUCKETS) else "+Inf"
    return [sample(f"{name}_bucket_raw", le=bucket, **labels),
            sample(f"{name}_sum", seconds, **labels), sample(f"{name}_count", **labels)]


def _stage_seconds(record: JobRecord) -> Iterator[tuple[str, float]]:
    spans = {
        "triage": (record.triage_started_at, record.triage_finished_at),
        "wait": (record.triage_finished_at, record.generation_started_at),
        "generate": (record.generation_started_at, record.generation_finished_at),
        "total": (record.submitted_at, record.finished_at),
    }
    for stage, (start, end) in spans.items():
        if start is not None and end is not None and end >= start:
            yield stage, end - start


def transition_samples(old: JobRecord, new: JobRecord) -> list[Sample]:
    """The counters a job-record change moves: triage's decision when the job is routed,
    its outcome, steps and stage latencies when it finishes. Other changes move none."""
    out: list[Sample] = []
    plan = new.plan
    exact = plan is not None and plan.route is Route.EXACT and new.state is JobState.SUCCEEDED
    route = new.route or ("exact" if exact else "none")
    routed = old.state is JobState.TRIAGE and (
        new.state is JobState.QUEUED and new.route or exact)
    if routed:
        out.append(sample("t2i_triage_decisions_total", route=route,
                          reason=str(plan.reason) if plan else "none"))
        if plan and plan.predicted_hit is not None:
            out.append(sample("t2i_predictor_decisions_total",
                              decision="lookup" if plan.predicted_hit else "skip",
                              audited=plan.audited))
    if old.state.terminal or not new.state.terminal:
        return out
    out.append(sample("t2i_jobs_finished_total", route=route, outcome=str(new.state)))
    if new.state is not JobState.SUCCEEDED:
        return out
    k = int(new.extra.get("resumed_from_k", 0))
    out.append(sample("t2i_steps_requested_total", new.request.steps))
    out.append(sample("t2i_steps_saved_total", new.request.steps if exact else k))
    if k:
        out.append(sample("t2i_cache_resumes_total", k=k))
    for stage, seconds in _stage_seconds(new):
        out.extend(histogram("t2i_stage_seconds", seconds, stage=stage))
    return out


def merged(samples: Iterable[Sample]) -> dict[str, float]:
    """Hash field -> amount, summing samples that share a field."""
    out: dict[str, float] = {}
    for item in samples:
        out[item.field] = out.get(item.field, 0.0) + item.value
    return out


def cumulative_buckets(raw: Mapping[str, float]) -> list[tuple[str, float]]:
    """Per-bucket counts (``le`` -> count) to Prometheus's cumulative ones, in bucket order."""
    order = [str(b) for b in LATENCY_BUCKETS] + ["+Inf"]
    running, out = 0.0, []
    for le in order:
        running += raw.get(le, 0.0)
        out.append((le, running))
    return out

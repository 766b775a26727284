"""Reading the prompt trace (gzip CSV, see ../shared/data/README.md)."""

from __future__ import annotations

import csv
import gzip
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
DEFAULT_TRACE = Path(__file__).resolve().parent.parent.parent / "shared/data/sd-discord-trace.csv.gz"


@dataclass(frozen=True)
class TraceRequest:
    channel: str
    seq: int
    user: str
    prompt: str
    seed: int
    width: int
    height: int
    cfg: float | None
    steps: int | None


def _float(text: str) -> float | None:
    return float(text) if text.strip() else None


def _int(text: str) -> int | None:
    return int(text) if text.strip() else None


def read_trace(path: Path, limit: int | None = None,
               channel: str | None = None) -> Iterator[TraceRequest]:
    """Rows of the trace in file order (chronological within a channel); rows with an empty
    prompt are skipped. ``channel`` keeps one channel only."""
    opener = gzip.open if path.suffix == ".gz" else open
    count = 0
    with opener(path, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            if channel and row["channel"] != channel:
                continue
            if not row["prompt"].strip():
                continue
            yield TraceRequest(channel=row["channel"], seq=int(row["seq"]), user=row["user_hash"],
                               prompt=row["prompt"], seed=int(row["seed"] or 0),
                               width=int(row["width"] or 512), height=int(row["height"] or 512),
                               cfg=_float(row["cfg"]), steps=_int(row["steps"]))
            count += 1
            if limit is not None and count >= limit:
                return


def interleaved(path: Path, seed: int, limit: int | None = None) -> list[TraceRequest]:
    """All channels merged by a seeded random merge: each channel keeps its own order, and
    the next request comes from a channel chosen in proportion to what it has left (so
    channels run concurrently, as they did)."""
    by_channel: dict[str, list[TraceRequest]] = {}
    for request in read_trace(path):
        by_channel.setdefault(request.channel, []).append(request)
    return seeded_merge([requests for _, requests in sorted(by_channel.items())],
                        random.Random(seed), limit)


def seeded_merge(sequences: list[list[T]], rng: random.Random, limit: int | None = None) -> list[T]:
    """Merge sequences, each keeping its own order: the next item comes from a sequence
    chosen in proportion to how many items it has left."""
    queues = [list(reversed(items)) for items in sequences if items]
    merged: list[T] = []
    while queues and (limit is None or len(merged) < limit):
        pick = rng.choices(range(len(queues)), weights=[len(q) for q in queues])[0]
        merged.append(queues[pick].pop())
        if not queues[pick]:
            queues.pop(pick)
    return merged

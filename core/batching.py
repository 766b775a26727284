"""Which waiting jobs join a GPU worker's running batch at a step boundary. Pure.

A batch advances all its jobs by one denoising step per UNet call, each at its own
timestep, so jobs join and leave between steps. What may share a call: jobs whose latents
have one shape (the worker serves one model; size sets the shape). Who joins, in arrival
order:

- up to ``capacity`` jobs in the batch;
- only the batch's shape (the oldest job's, or, in an empty batch, the oldest waiting
  job's). When the oldest waiting job has another shape, nothing more joins, so the batch
  drains and that job's shape comes next: no job waits longer than one batch's remaining
  steps behind the jobs of another shape;
- a redelivered job (its earlier worker died holding it) runs alone, so a job that kills
  its worker takes no other job down with it more than once, and the poison-job rule
  (fail after T2I_MAX_DELIVERIES) counts only its own deliveries.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Slot:
    """A job as the batch admission sees it."""

    job_id: str
    shape: Hashable           # jobs of one shape may share a UNet call
    redelivered: bool = False


def admit(active: Sequence[Slot], waiting: Sequence[Slot], capacity: int) -> list[Slot]:
    """The waiting jobs (oldest first) that join ``active`` now."""
    if capacity < 1:
        raise ValueError(f"batch capacity {capacity} must be at least 1")
    if any(slot.redelivered for slot in active):
        return []
    joining: list[Slot] = []
    shape = active[0].shape if active else None
    for slot in waiting:
        if len(active) + len(joining) >= capacity:
            break
        if slot.redelivered:
            if not active and not joining:
                joining.append(slot)
            break
        if shape is None:
            shape = slot.shape
        if slot.shape != shape:
            break   # the oldest of another shape waits for the batch to drain; no one passes it
        joining.append(slot)
    return joining

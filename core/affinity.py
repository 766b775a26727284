"""Adapter affinity: which GPU worker a LoRA job is sent to directly. Pure.

A worker keeps recently used LoRAs resident (workers.lora.AdapterCache); one that must
fetch a job's LoRA loads it while the job's first steps run, and the job waits from
T2I_LORA_FROM of its steps if the load is not done. Triage sends a LoRA job to a live worker
that already holds its LoRAs (T2I_LORA_AFFINITY):

- ``free``: only while that worker has a free slot (its jobs in hand and waiting in its own
  queue fewer than its batch capacity, as the workers last told), so a job does not wait
  for a holder while another worker could start it (up to what those counts miss: jobs
  routed by triage processes deciding at the same moment);
- ``queue``: also, when no worker has a free slot (the job waits anyway), up to one batch
  waiting in the holder's own queue: fewer loads where they are slow, a little pooling lost
  where they are hidden (bench.affinity measures both);
- ``off``: never.

Otherwise the job goes to the shared queue, which every worker takes from.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MODES = ("off", "free", "queue")


@dataclass(frozen=True)
class WorkerView:
    """A live GPU worker as triage sees it."""

    node: str                   # Celery node name (its own queue is named after it)
    resident: frozenset[str]    # content digests of the LoRAs it holds
    capacity: int               # jobs it runs at once (T2I_GPU_BATCH)
    load: int                   # jobs it holds now plus those waiting in its own queue


def preferred_worker(digests: Sequence[str], workers: Iterable[WorkerView],
                     mode: str = "free") -> str | None:
    """The node to send a job needing LoRAs ``digests`` to: of the workers ``mode`` allows,
    the one holding the most of them (then the least loaded, then by name, so the choice is
    stable); None when the job has none, or no allowed worker holds any."""
    if mode not in MODES:
        raise ValueError(f"affinity mode {mode!r} is not one of {MODES}")
    needed, workers = set(digests), list(workers)
    if not needed or mode == "off":
        return None
    busy = all(worker.load >= worker.capacity for worker in workers)
    batches = 2 if mode == "queue" and busy else 1   # running plus, if so, one waiting
    holders = [worker for worker in workers
               if worker.load < batches * worker.capacity and needed & worker.resident]
    best = min(holders, key=lambda worker: (-len(needed & worker.resident), worker.load,
                                            worker.node), default=None)
    return best.node if best else None

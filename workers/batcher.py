"""A GPU worker's step-level batcher: one thread owns the engine and advances every active
job by one step per UNet call; jobs join and leave at step boundaries (core.batching
decides who joins).

The Celery worker runs a pool of T2I_GPU_BATCH threads; each task thread runs its job's
generation code as before, but its engine is a ``BatchingEngine``, whose ``generate`` and
``resume`` hand the job to the batcher and block until its image is ready. So each message
is still acknowledged only when its own image is stored (late ack), by its own thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from core.batching import Slot, admit
from core.errors import BatcherStopped
from core.jobs import JobRequest
from core.plan import Reseed
from workers.engine import (
    Engine,
    Generation,
    JoinCallback,
    LatentSource,
    StepCallback,
    Trajectory,
)

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    """A job handed to the batcher, and where its result goes."""

    request: JobRequest
    on_step: StepCallback
    capture_steps: frozenset[int]
    latent: LatentSource | None
    start_step: int
    reseed: Reseed | None
    alone: bool
    on_join: JoinCallback
    result: Future[Generation] = field(default_factory=Future)

    @property
    def slot(self) -> Slot:
        return Slot(str(id(self)), (self.request.height, self.request.width), self.alone)


class BatchingEngine:
    """The engine's interface (``generate``, ``resume``, ``label``, ``latent_shape``) for
    many task threads at once, batched by one thread that owns the ``Engine``."""

    def __init__(self, engine: Engine, capacity: int) -> None:
        self.engine, self.capacity = engine, capacity
        self.label = engine.label
        self._inbox: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="gpu-batcher", daemon=True)
        self._thread.start()

    def latent_shape(self, request: JobRequest) -> tuple[int, int, int, int]:
        return self.engine.latent_shape(request)

    def resident_adapters(self) -> list[str]:
        return self.engine.resident_adapters()

    def generate(self, request: JobRequest, on_step: StepCallback,
                 capture_steps: frozenset[int] = frozenset(), alone: bool = False,
                 on_join: JoinCallback = None) -> Generation:
        """As ``Engine.generate``, in a batch; ``alone``: in a batch of its own (a
        redelivered job, which may be what killed the worker before); ``on_join`` is called
        (on the batcher's thread) as it joins."""
        return self._submit(_Pending(request, on_step, capture_steps, None, 0, None, alone,
                                     on_join))

    def resume(self, request: JobRequest, latent: LatentSource, start_step: int,
               on_step: StepCallback, capture_steps: frozenset[int] = frozenset(),
               reseed: Reseed | None = None, alone: bool = False,
               on_join: JoinCallback = None) -> Generation:
        """As ``Engine.resume``, in a batch (joining it at its own step)."""
        return self._submit(_Pending(request, on_step, capture_steps, latent, start_step,
                                     reseed, alone, on_join))

    def close(self) -> None:
        """Stop the batcher thread once the jobs handed to it are done."""
        self._inbox.put(None)
        self._thread.join()

    def _submit(self, pending: _Pending) -> Generation:
        if not self._thread.is_alive():
            raise BatcherStopped("the batcher thread is not running")
        self._inbox.put(pending)
        return pending.result.result()

    def _run(self) -> None:
        """The batcher thread: the loop, and whatever ends it, no job left waiting."""
        waiting: deque[_Pending] = deque()
        active: list[tuple[_Pending, Trajectory]] = []
        try:
            self._loop(waiting, active)
        except BaseException:
            log.exception("the batcher thread failed")
            raise
        finally:
            stopped = BatcherStopped("the batcher thread stopped before this job finished")
            while not self._inbox.empty():
                if (late := self._inbox.get_nowait()) is not None:
                    waiting.append(late)
            for pending in [*waiting, *(pending for pending, _ in active)]:
                if not pending.result.done():
                    pending.result.set_exception(stopped)

    def _loop(self, waiting: deque[_Pending], active: list[tuple[_Pending, Trajectory]]
              ) -> None:
        closing = False
        while not (closing and not active and not waiting):
            arrived = [self._inbox.get()] if not active and not waiting else []  # idle: sleep
            while not self._inbox.empty():
                arrived.append(self._inbox.get_nowait())
            closing = closing or None in arrived
            waiting.extend(pending for pending in arrived if pending is not None)
            joining = admit([pending.slot for pending, _ in active],
                            [pending.slot for pending in waiting], self.capacity)
            for _ in joining:                          # always a prefix of ``waiting``
                pending = waiting.popleft()
                try:
                    if pending.on_join:
                        pending.on_join()
                    active.append((pending, self.engine.begin(
                        pending.request, pending.on_step, pending.capture_steps,
                        pending.latent, pending.start_step, pending.reseed)))
                except Exception as exc:  # noqa: BLE001 - the job's own error, for its thread
                    pending.result.set_exception(exc)
            if active:
                active[:] = self._step(active)

    def _step(self, active: list[tuple[_Pending, Trajectory]]
              ) -> list[tuple[_Pending, Trajectory]]:
        """One UNet call for all; returns the jobs still running. If the batched call fails
        (out of memory, say), each job takes this step alone, so only a job that fails on its
        own fails (the call raises before any job's state changes)."""
        stopped: dict[int, BaseException] = {}
        before = [trajectory.done for _, trajectory in active]
        try:
            stopped = self.engine.advance([trajectory for _, trajectory in active])
        except Exception as exc:  # noqa: BLE001
            if len(active) == 1 or before != [trajectory.done for _, trajectory in active]:
                stopped = dict.fromkeys(range(len(active)), exc)
            else:
                log.warning("batched step of %d jobs failed (%s); each job steps alone",
                            len(active), exc)
                for position, (_, trajectory) in enumerate(active):
                    try:
                        if alone := self.engine.advance([trajectory]):
                            stopped[position] = alone[0]
                    except Exception as alone_exc:  # noqa: BLE001 - this job's own failure
                        stopped[position] = alone_exc
        running = []
        for position, (pending, trajectory) in enumerate(active):
            if position in stopped:
                pending.result.set_exception(stopped[position])
            elif trajectory.finished:
                try:
                    pending.result.set_result(self.engine.finish(trajectory))
                except Exception as exc:  # noqa: BLE001
                    pending.result.set_exception(exc)
            else:
                running.append((pending, trajectory))
        return running

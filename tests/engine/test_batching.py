"""Step-level batching in the engine (the tiny pipeline, in process, CPU): jobs at different
steps, one full and one resumed at K, joining and leaving at step boundaries, share one
UNet call per step, and each comes out as it would alone."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from core.errors import JobCancelled
from core.jobs import JobRequest
from core.plan import Reseed, SeedRule
from tests.engine.shared import no_op, pixels
from workers.builtin_models import build_tiny_pipeline
from workers.engine import Engine, Generation, Trajectory

STEPS, K = 10, 5
LAST = frozenset({STEPS - 1, STEPS})


@pytest.fixture(scope="module", params=["ddim", "euler"])
def engine(request) -> Engine:
    return Engine(build_tiny_pipeline(), request.param, torch.device("cpu"), "tiny (test)")


def request(prompt: str, seed: int, guidance: float = 7.5) -> JobRequest:
    return JobRequest(prompt=prompt, negative_prompt="", steps=STEPS, guidance=guidance,
                      seed=seed, width=64, height=64)


def assert_same(batched: Generation, alone: Generation) -> None:
    assert batched.unet_calls == alone.unet_calls
    for step in alone.captured:
        assert torch.allclose(batched.captured[step], alone.captured[step], atol=1e-4)
    assert np.abs(pixels(batched) - pixels(alone)).max() <= 1


@pytest.fixture(scope="module")
def cached(engine: Engine) -> torch.Tensor:
    return engine.generate(request("a red fox in the snow", 5), no_op,
                           frozenset({K})).captured[K]


def jobs(engine: Engine, cached: torch.Tensor) -> dict[str, Trajectory]:
    """A full job, a re-roll resumed at K with its noise swapped, an unguided full job."""
    return {
        "full": engine.begin(request("a blue boat on a lake", 1), no_op, LAST),
        "resumed": engine.begin(request("a red fox in the snow", 6, guidance=5.0), no_op, LAST,
                                cached, K, Reseed(SeedRule.NOISE_SWAP, 5, K)),
        "unguided": engine.begin(request("a green hill", 2, guidance=1.0), no_op, LAST),
    }


def test_jobs_at_different_steps_share_unet_calls_and_each_matches_its_run_alone(
        engine, cached, unet_calls):
    alone = {name: engine.run_alone(trajectory)
             for name, trajectory in jobs(engine, cached).items()}
    unet_calls.clear()
    waiting = jobs(engine, cached)
    active = {"full": waiting.pop("full")}
    finished: dict[str, Generation] = {}
    steps = 0
    while active or waiting:
        if steps == 2:      # the resumed job joins the full one at its step 3, at its own K
            active["resumed"] = waiting.pop("resumed")
        if steps == 4:
            active["unguided"] = waiting.pop("unguided")
        assert engine.advance(list(active.values())) == {}
        steps += 1
        for name in [name for name, trajectory in active.items() if trajectory.finished]:
            finished[name] = engine.finish(active.pop(name))   # leaves; the others go on
    # One UNet call per step of the batch: 4 + 10 alone would have taken 10 + 5 + 10.
    assert len(unet_calls) == steps == 14
    for name, generation in alone.items():
        assert_same(finished[name], generation)
        assert (generation.batch_peak, finished[name].batch_peak) == (1, 3)


def test_a_cancelled_job_stops_alone_and_the_batch_goes_on(engine, cached):
    alone = engine.run_alone(jobs(engine, cached)["full"])
    batch = jobs(engine, cached)

    def cancel_at_3(step: int, total: int) -> None:
        if step == 3:
            raise JobCancelled("cancelled")

    batch["resumed"].on_step = cancel_at_3
    active = [batch["full"], batch["resumed"]]
    stopped: dict[int, BaseException] = {}
    while not stopped:
        stopped = engine.advance(active)
    assert list(stopped) == [1] and isinstance(stopped[1], JobCancelled)
    assert batch["resumed"].done == 3
    active = [batch["full"]]
    while not batch["full"].finished:
        assert engine.advance(active) == {}
    assert_same(engine.finish(batch["full"]), alone)


def test_task_threads_share_the_batchers_unet_calls_and_get_their_own_images(
        engine, cached, unet_calls):
    from concurrent.futures import ThreadPoolExecutor

    from workers.batcher import BatchingEngine

    full = request("a blue boat on a lake", 1)
    reroll = request("a red fox in the snow", 6, guidance=5.0)
    swap = Reseed(SeedRule.NOISE_SWAP, 5, K)
    alone = [engine.generate(full, no_op, LAST),
             engine.resume(reroll, cached, K, no_op, LAST, swap)]
    unet_calls.clear()
    batching = BatchingEngine(engine, capacity=4)

    def hold_until_the_resume_waits(step: int, total: int) -> None:
        """The full job's first step waits until the resumed one is handed over, so it
        joins this batch (a test of sharing, not of arrival timing)."""
        while step == 1 and batching._inbox.qsize() == 0:
            threading.Event().wait(0.01)

    with ThreadPoolExecutor(2) as threads:
        first = threads.submit(batching.generate, full, hold_until_the_resume_waits, LAST)
        threading.Event().wait(0.2)
        second = threads.submit(batching.resume, reroll, cached, K, no_op, LAST, swap)
        batched = [first.result(timeout=60), second.result(timeout=60)]
    batching.close()
    assert len(unet_calls) == STEPS   # the resumed job's 5 steps rode along the full one's
    for got, expected in zip(batched, alone):
        assert_same(got, expected)
        assert got.batch_peak == 2


def test_a_batched_step_that_fails_is_taken_by_each_job_alone(engine, cached):
    """A UNet call that fails for the whole batch (out of memory, say) but not for one job:
    each job takes that step alone and goes on; all images as alone."""
    from workers.batcher import BatchingEngine

    full, other = request("a blue boat on a lake", 1), request("a green hill", 2)
    alone = [engine.generate(full, no_op, LAST), engine.generate(other, no_op, LAST)]
    failures: list[int] = []

    def out_of_memory_above_2_rows(module, args):
        if args[0].shape[0] > 2 and not failures:
            failures.append(args[0].shape[0])
            raise RuntimeError("CUDA out of memory (simulated)")

    hook = engine.pipe.unet.register_forward_pre_hook(out_of_memory_above_2_rows)
    batching = BatchingEngine(engine, capacity=2)
    try:
        from concurrent.futures import ThreadPoolExecutor

        def hold_until_the_other_waits(step: int, total: int) -> None:
            while step == 1 and batching._inbox.qsize() == 0:
                threading.Event().wait(0.01)

        with ThreadPoolExecutor(2) as threads:
            first = threads.submit(batching.generate, full, hold_until_the_other_waits, LAST)
            threading.Event().wait(0.2)
            second = threads.submit(batching.generate, other, no_op, LAST)
            batched = [first.result(timeout=60), second.result(timeout=60)]
    finally:
        hook.remove()
        batching.close()
    assert failures == [4]   # two guided jobs: 4 rows failed once, then went on
    for got, expected in zip(batched, alone):
        assert_same(got, expected)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_jobs_are_failed_not_stranded_when_the_batcher_thread_dies(engine):
    from core.errors import BatcherStopped
    from workers.batcher import BatchingEngine

    batching = BatchingEngine(engine, capacity=2)

    def dies(step: int, total: int) -> None:
        raise SystemExit("the batcher thread dies")   # not an Exception: nothing catches it

    with pytest.raises(BatcherStopped):
        batching.generate(request("a blue boat on a lake", 1), dies)
    batching._thread.join(timeout=10)
    with pytest.raises(BatcherStopped):
        batching.generate(request("a green hill", 2), no_op)

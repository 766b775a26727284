"""The step cache in the engine (the tiny pipeline, in process, CPU): shallow steps run
fewer UNet blocks, resumes from a step-cached run's captured latents reproduce it, and
batched jobs at different steps each keep their own deep features."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from core.errors import JobCancelled, ModelLoadError
from core.jobs import JobRequest
from core.stepcache import StepCache
from tests.engine.shared import no_op, pixels
from workers.builtin_models import build_tiny_pipeline
from workers.engine import Engine
from workers.step_cache import SplitUNet

STEPS = 10


def request(prompt: str = "a red fox in the snow", seed: int = 5,
            guidance: float = 7.5) -> JobRequest:
    return JobRequest(prompt=prompt, negative_prompt="", steps=STEPS, guidance=guidance,
                      seed=seed, width=64, height=64)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline()


@pytest.fixture(scope="module", params=["ddim", "euler"])
def engines(request, pipe) -> tuple[Engine, Engine]:
    """(without, with deepcache:3) on one pipeline."""
    return (Engine(pipe, request.param, torch.device("cpu"), "tiny (test)"),
            Engine(pipe, request.param, torch.device("cpu"), "tiny (test)", StepCache(3)))


@pytest.fixture
def block_calls(pipe) -> Iterator[list[str]]:
    """The UNet blocks evaluated while the test runs, by name, in order."""
    unet, calls = pipe.unet, []
    blocks = {f"down{i}": b for i, b in enumerate(unet.down_blocks)}
    blocks |= {"mid": unet.mid_block} | {f"up{i}": b for i, b in enumerate(unet.up_blocks)}
    handles = [block.register_forward_hook(lambda *args, name=name: calls.append(name))
               for name, block in blocks.items()]
    yield calls
    for handle in handles:
        handle.remove()


def test_a_step_cached_generation_evaluates_fewer_unet_blocks(engines, block_calls):
    plain, cached = engines
    plain.generate(request(), no_op)
    without = list(block_calls)
    block_calls.clear()
    result = cached.generate(request(), no_op)
    # steps 0, 3, 6, 9 run the whole UNet (5 blocks), the 6 others the outer two
    assert len(without) == 5 * STEPS
    assert len(block_calls) == 5 * 4 + 2 * 6
    assert block_calls.count("down1") == block_calls.count("up0") == 4
    assert block_calls.count("down0") == block_calls.count("up1") == STEPS
    assert (result.unet_calls, result.shallow_unet_calls) == (STEPS, 6)


def test_the_warm_up_runs_the_first_steps_of_the_grid_whole(engines, block_calls):
    plain, _ = engines
    warm = Engine(plain.pipe, plain.scheduler_name, plain.device, plain.label,
                  StepCache.parse("deepcache:3:0.5"))
    full = warm.generate(request(), no_op, frozenset({2}))
    assert full.shallow_unet_calls == 3            # whole: 0-4, 5, 8
    block_calls.clear()
    resumed = warm.resume(request(), full.captured[2], 2, no_op)
    assert resumed.shallow_unet_calls == 3         # whole: 2-4 (the warm-up's rest), 5, 8
    assert block_calls.count("down1") == 5


def test_the_step_cache_changes_the_image_little(engines):
    plain, cached = engines
    difference = np.abs(pixels(cached.generate(request(), no_op))
                        - pixels(plain.generate(request(), no_op)))
    assert 0 < difference.mean() < 10


@pytest.mark.parametrize(("k", "shallow"), [(3, 4), (6, 2)])
def test_a_resume_from_its_captured_latent_reproduces_the_step_cached_run(engines, k, shallow):
    """A run's schedule restarts at a resume (its first step is whole): from a K on the
    interval, the resumed run takes the very steps the original took."""
    _, cached = engines
    full = cached.generate(request(), no_op, frozenset({k, STEPS}))
    resumed = cached.resume(request(), full.captured[k], k, no_op, frozenset({STEPS}))
    assert (resumed.unet_calls, resumed.shallow_unet_calls) == (STEPS - k, shallow)
    assert torch.allclose(resumed.captured[STEPS], full.captured[STEPS], atol=1e-5)
    assert np.abs(pixels(resumed) - pixels(full)).max() <= 1


def test_batched_jobs_at_different_steps_keep_their_own_deep_features(engines):
    """Three jobs (guided, unguided, resumed at K 4) join a batch at different steps, so
    most UNet calls mix rows refreshing their features with rows reusing theirs."""
    _, cached = engines
    jobs = [request("a red fox", 1), request("a lighthouse", 2, guidance=1.0),
            request("a bowl of soup", 3)]
    source = cached.generate(request("a bowl of broth", 3), no_op, frozenset({4}))
    alone = [cached.generate(jobs[0], no_op, frozenset({STEPS})),
             cached.generate(jobs[1], no_op, frozenset({STEPS})),
             cached.resume(jobs[2], source.captured[4], 4, no_op, frozenset({STEPS}))]
    first = cached.begin(jobs[0], no_op, frozenset({STEPS}))
    cached.advance([first])
    second = cached.begin(jobs[1], no_op, frozenset({STEPS}))
    cached.advance([first, second])
    third = cached.begin(jobs[2], no_op, frozenset({STEPS}), source.captured[4], 4)
    trajectories = [first, second, third]
    while active := [t for t in trajectories if not t.finished]:
        cached.advance(active)
    for trajectory, expected in zip(trajectories, alone):
        batched = cached.finish(trajectory)
        assert batched.shallow_unet_calls == expected.shallow_unet_calls
        assert torch.allclose(batched.captured[STEPS], expected.captured[STEPS], atol=1e-4)


def test_a_cancelled_step_cached_job_stops_at_its_next_step(engines):
    _, cached = engines
    seen = []

    def cancel_at_four(step: int, total: int) -> None:
        seen.append(step)
        if step == 4:
            raise JobCancelled("job-1")

    with pytest.raises(JobCancelled):
        cached.generate(request(), cancel_at_four)
    assert seen == [1, 2, 3, 4]


def test_the_split_unet_with_every_row_whole_is_the_unet(pipe):
    unet, split = pipe.unet, SplitUNet(pipe.unet)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(3, 4, 8, 8, generator=generator)
    text = torch.randn(3, 77, unet.config.cross_attention_dim, generator=generator)
    timesteps = torch.tensor([900.0, 400.0, 10.0])
    with torch.inference_mode():
        expected = unet(sample, timesteps, encoder_hidden_states=text).sample
        whole, deep = split(sample, timesteps, text, torch.ones(3, dtype=torch.bool), None)
        mixed, merged = split(sample, timesteps, text, torch.tensor([False, True, False]),
                              deep[[0, 2]])
    assert torch.equal(whole, expected)
    # the deep part ran on one row instead of three: the same up to float summation order
    assert torch.allclose(mixed, expected, atol=1e-5) and torch.allclose(merged, deep, atol=1e-5)


def test_the_step_cache_refuses_a_unet_with_inputs_it_does_not_pass():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1,
                                cross_attention_dim=32, norm_num_groups=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                class_embed_type="timestep")
    with pytest.raises(ModelLoadError, match="class_embed_type"):
        SplitUNet(unet)

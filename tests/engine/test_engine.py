"""Capture and resume on the tiny pipeline (in process, CPU): the heart of the cache."""

from __future__ import annotations

import pytest
import torch

from core.errors import CorruptLatent, JobCancelled
from core.jobs import JobRequest
from tests.engine.shared import no_op
from workers.builtin_models import build_tiny_pipeline
from workers.engine import Engine
from workers.latents import decode_latent, encode_latent

STEPS = 10


def request(prompt: str = "a red fox in the snow", seed: int = 5) -> JobRequest:
    return JobRequest(prompt=prompt, negative_prompt="", steps=STEPS, guidance=7.5, seed=seed,
                      width=64, height=64)


@pytest.fixture(scope="module", params=["ddim", "euler"])
def engine(request) -> Engine:
    return Engine(build_tiny_pipeline(), request.param, torch.device("cpu"), "tiny (test)")


def test_full_generation_captures_requested_steps(engine: Engine, unet_calls):
    result = engine.generate(request(), no_op, frozenset({2, 5}))
    assert len(unet_calls) == STEPS == result.unet_calls
    assert sorted(result.captured) == [2, 5]
    assert result.captured[2].shape == engine.latent_shape(request()) == (1, 4, 8, 8)
    assert not torch.equal(result.captured[2], result.captured[5])


@pytest.mark.parametrize("k", [1, 5, 9])
def test_resume_runs_exactly_n_minus_k_unet_steps(engine: Engine, unet_calls, k):
    latent = engine.generate(request(), no_op, frozenset({k})).captured[k]
    unet_calls.clear()
    result = engine.resume(request("a red fox in the snow, at night"), latent, k, no_op)
    assert len(unet_calls) == STEPS - k == result.unet_calls


@pytest.mark.parametrize("k", [2, 5])
def test_same_prompt_resume_reproduces_the_uninterrupted_run(engine: Engine, k):
    full = engine.generate(request(), no_op, frozenset({k, STEPS}))
    resumed = engine.resume(request(), full.captured[k], k, no_op, frozenset({STEPS}))
    assert (resumed.captured[STEPS] - full.captured[STEPS]).abs().max().item() <= 1e-4


def test_resume_through_fp16_storage_stays_close(engine: Engine):
    full = engine.generate(request(), no_op, frozenset({5, STEPS}))
    stored = decode_latent(encode_latent(full.captured[5], "p"), "p", (1, 4, 8, 8))
    resumed = engine.resume(request(), stored, 5, no_op, frozenset({STEPS}))
    scale = full.captured[STEPS].abs().max().item()
    assert (resumed.captured[STEPS] - full.captured[STEPS]).abs().max().item() <= 1e-2 * scale


def test_other_prompt_resume_differs_from_the_cached_run(engine: Engine):
    full = engine.generate(request(), no_op, frozenset({5, STEPS}))
    other = engine.resume(request("a blue whale under the sea"), full.captured[5], 5, no_op,
                          frozenset({STEPS}))
    assert (other.captured[STEPS] - full.captured[STEPS]).abs().max().item() > 1e-3


def test_resume_outside_the_run_is_refused(engine: Engine):
    latent = torch.zeros(1, 4, 8, 8)
    for k in (0, STEPS):
        with pytest.raises(ValueError, match="outside"):
            engine.resume(request(), latent, k, no_op)


def test_cancel_stops_at_the_next_step(engine: Engine, unet_calls):
    def cancel_after_three(step: int, total: int) -> None:
        if step == 3:
            raise JobCancelled("j")

    with pytest.raises(JobCancelled):
        engine.generate(request(), cancel_after_three)
    assert len(unet_calls) == 3


def test_latent_round_trip_and_every_kind_of_bad_latent():
    latent = torch.randn(1, 4, 8, 8)
    data = encode_latent(latent, "part-a")
    assert torch.allclose(decode_latent(data, "part-a", (1, 4, 8, 8)), latent, atol=1e-2)
    with pytest.raises(CorruptLatent, match="too short"):
        decode_latent(data[:5], "part-a", (1, 4, 8, 8))
    with pytest.raises(CorruptLatent):
        decode_latent(data[: len(data) // 2], "part-a", (1, 4, 8, 8))
    with pytest.raises(CorruptLatent, match="partition 'part-a'"):
        decode_latent(data, "part-b", (1, 4, 8, 8))
    with pytest.raises(CorruptLatent, match="shape"):
        decode_latent(data, "part-a", (1, 4, 16, 16))
    from safetensors.torch import save
    as_fp32 = save({"latent": latent}, metadata={"partition": "part-a"})
    with pytest.raises(CorruptLatent, match="dtype"):
        decode_latent(as_fp32, "part-a", (1, 4, 8, 8))
    with pytest.raises(CorruptLatent, match="NaN"):
        decode_latent(encode_latent(torch.full((1, 4, 8, 8), float("nan")), "part-a"),
                      "part-a", (1, 4, 8, 8))

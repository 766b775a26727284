"""Seed rules on resume (the tiny pipeline, in process, CPU): a re-roll (same prompt, another
seed) resumed from a cached latent gets its own picture, reproducibly, and plain resume
stays what it was."""

from __future__ import annotations

import pytest
import torch

from core.jobs import JobRequest
from core.plan import Reseed, SeedRule
from tests.engine.shared import no_op
from workers.builtin_models import build_tiny_pipeline
from workers.engine import SCHEDULERS, Engine

STEPS, K, SOURCE_SEED = 10, 5, 5
RUN_FROM = {SeedRule.NOISE_SWAP: K, SeedRule.RENOISE: 2, SeedRule.STOCHASTIC_TAIL: K}


def request(seed: int) -> JobRequest:
    return JobRequest(prompt="a red fox in the snow", negative_prompt="", steps=STEPS,
                      guidance=7.5, seed=seed, width=64, height=64)


def reseed(rule: SeedRule) -> Reseed:
    return Reseed(rule, SOURCE_SEED, RUN_FROM[rule])


@pytest.fixture(scope="module", params=["ddim", "euler"])
def engine(request) -> Engine:
    return Engine(build_tiny_pipeline(), request.param, torch.device("cpu"), "tiny (test)")


@pytest.fixture(scope="module")
def cached(engine: Engine) -> torch.Tensor:
    """The source generation's latent after K steps, as the cache holds it."""
    return engine.generate(request(SOURCE_SEED), no_op, frozenset({K})).captured[K]


@pytest.mark.parametrize("rule", list(RUN_FROM))
def test_rerolls_resumed_with_a_rule_differ_and_each_reproduces(engine: Engine, cached, rule):
    images = [engine.resume(request(seed), cached, K, no_op, reseed=reseed(rule)).image_png
              for seed in (6, 7, 8)]
    assert len(set(images)) == 3
    again = engine.resume(request(7), cached, K, no_op, reseed=reseed(rule)).image_png
    assert again == images[1]


def test_without_a_rule_rerolls_return_the_cached_picture(engine: Engine, cached):
    """The problem the rules solve, and plain resume kept as it was: None, SAME_SEED and
    K_CAP resume as is (the seed is not used), and reproduce the uninterrupted source run."""
    full = engine.generate(request(SOURCE_SEED), no_op, frozenset({STEPS}))
    plain = [engine.resume(request(seed), cached, K, no_op, frozenset({STEPS}), reseed=rule)
             for seed, rule in ((6, None), (7, Reseed(SeedRule.SAME_SEED, 7, K)),
                                (8, Reseed(SeedRule.K_CAP, SOURCE_SEED, K)))]
    assert len({result.image_png for result in plain}) == 1
    assert all(result.unet_calls == STEPS - K for result in plain)
    assert (plain[0].captured[STEPS] - full.captured[STEPS]).abs().max().item() <= 1e-4


def test_noise_swap_to_the_source_seed_changes_nothing(engine: Engine, cached):
    plain = engine.resume(request(SOURCE_SEED), cached, K, no_op, frozenset({K + 1, STEPS}))
    swapped = engine.resume(request(SOURCE_SEED), cached, K, no_op, frozenset({K + 1, STEPS}),
                            reseed=reseed(SeedRule.NOISE_SWAP))
    assert swapped.image_png == plain.image_png
    assert all(torch.equal(swapped.captured[s], plain.captured[s]) for s in (K + 1, STEPS))


def test_noise_swap_moves_the_latent_by_the_noise_difference(engine: Engine, cached):
    """At K the swapped latent is the cached one plus c_K (job noise - source noise): its
    first step equals a plain resume from that latent."""
    job = request(9)
    shift = engine.seed_noise(job, 9) - engine.seed_noise(job, SOURCE_SEED)
    schedule = SCHEDULERS[engine.scheduler_name].from_config(engine.pipe.scheduler.config)
    schedule.set_timesteps(STEPS)
    # The latent after K steps is the input of step K + 1: at that step's timestep (sigma).
    level = (float(1 - schedule.alphas_cumprod[int(schedule.timesteps[K])]) ** 0.5
             if engine.scheduler_name == "ddim" else float(schedule.sigmas[K]))
    expected = engine.resume(job, cached + level * shift, K, no_op, frozenset({K + 1}))
    swapped = engine.resume(job, cached, K, no_op, frozenset({K + 1}),
                            reseed=reseed(SeedRule.NOISE_SWAP))
    assert torch.allclose(swapped.captured[K + 1], expected.captured[K + 1], atol=1e-5)


@pytest.mark.parametrize("rule", list(RUN_FROM))
def test_each_rule_runs_n_minus_run_from_unet_steps(engine: Engine, cached, unet_calls, rule):
    totals: list[int] = []
    result = engine.resume(request(6), cached, K, lambda step, total: totals.append(total),
                           reseed=reseed(rule))
    assert len(unet_calls) == STEPS - RUN_FROM[rule] == result.unet_calls == totals[0]
    assert len(totals) == result.unet_calls


@pytest.mark.parametrize("rule", list(RUN_FROM))
def test_captured_latents_are_the_runs_own(engine: Engine, cached, rule):
    everything = frozenset(range(1, STEPS + 1))
    result = engine.resume(request(6), cached, K, no_op, everything, reseed=reseed(rule))
    assert sorted(result.captured) == list(range(RUN_FROM[rule] + 1, STEPS + 1))
    with torch.inference_mode():
        assert engine._decode(result.captured[STEPS]) == result.image_png
    if rule is not SeedRule.STOCHASTIC_TAIL:  # deterministic: a plain resume retraces the run
        step = RUN_FROM[rule] + 1
        retraced = engine.resume(request(6), result.captured[step], step, no_op,
                                 frozenset({STEPS}))
        assert (retraced.captured[STEPS] - result.captured[STEPS]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("rule, run_from", [(SeedRule.RENOISE, K), (SeedRule.RENOISE, -1),
                                            (SeedRule.NOISE_SWAP, 2),
                                            (SeedRule.STOCHASTIC_TAIL, K + 1)])
def test_a_run_from_step_the_rule_cannot_take_is_refused(engine: Engine, cached, rule, run_from):
    with pytest.raises(ValueError, match="cannot run from"):
        engine.resume(request(6), cached, K, no_op, reseed=Reseed(rule, SOURCE_SEED, run_from))

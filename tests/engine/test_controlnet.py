"""ControlNets in the engine (the tiny pipeline, in process, CPU): the residuals join the UNet
exactly as diffusers' UNet joins them, a controlled job shares a batch with plain and other
controlled jobs without cross-talk, the branch beside the UNet gives the inline result, and
the step cache runs with it. (The ControlNet is made from the tiny UNet with its zero
convolutions and control-image encoder randomised, so the image has an effect;
quality.addons measures the trained one.)"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel

from core.addons import ControlRef, control_key
from core.jobs import JobRequest
from core.objectstore import InMemoryObjectStore
from core.stepcache import NO_STEP_CACHE, StepCache
from tests.engine.shared import no_op, pixels, square_png, tiny_controlnet
from workers.builtin_models import build_tiny_pipeline
from workers.controlnet import ControlConfig
from workers.engine import Engine
from workers.step_cache import SplitUNet

STEPS = 8


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline()


@pytest.fixture(scope="module")
def controlnet_dir(pipe, tmp_path_factory) -> Path:
    return tiny_controlnet(pipe.unet, tmp_path_factory.mktemp("controlnet"))


@pytest.fixture(scope="module")
def store() -> InMemoryObjectStore:
    return InMemoryObjectStore()


def control(store: InMemoryObjectStore, x: int, scale: float = 1.0) -> ControlRef:
    """A white square at column ``x`` on black, stored as a job's control image."""
    image = square_png(x)
    digest = hashlib.sha256(image).hexdigest()
    store.put(control_key(digest), image)
    return ControlRef("edges", scale, digest)


def request(ref: ControlRef | None = None, seed: int = 5) -> JobRequest:
    return JobRequest("a red fox in the snow", "", STEPS, 7.5, seed, 64, 64, controlnet=ref)


def engine(pipe, store, controlnet_dir, parallel: bool = True,
           step_cache: StepCache = NO_STEP_CACHE) -> Engine:
    return Engine(pipe, "ddim", torch.device("cpu"), "tiny (test)", step_cache,
                  controls=ControlConfig(store.get, {"edges": str(controlnet_dir)}, parallel))


@torch.inference_mode()
def test_residuals_join_the_unet_as_diffusers_joins_them(pipe, controlnet_dir):
    unet = pipe.unet
    controlnet = ControlNetModel.from_pretrained(controlnet_dir)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    timesteps = torch.tensor([700.0, 300.0])
    image = torch.rand(2, 3, 64, 64, generator=generator)
    down, mid = controlnet(sample, timesteps, text, controlnet_cond=image, return_dict=False)
    expected = unet(sample, timesteps, text, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
    got, _ = SplitUNet(unet)(sample, timesteps, text, torch.ones(2, dtype=torch.bool), None,
                             lambda: (list(down), mid))
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, unet(sample, timesteps, text).sample, atol=1e-3)


def test_a_controlled_job_follows_its_image(pipe, store, controlnet_dir):
    served = engine(pipe, store, controlnet_dir)
    plain = served.generate(request(), no_op)
    left = served.generate(request(control(store, 4)), no_op)
    right = served.generate(request(control(store, 36)), no_op)
    assert np.abs(pixels(left) - pixels(plain)).mean() > 3
    assert np.abs(pixels(left) - pixels(right)).mean() > 3
    assert served.generate(request(control(store, 4)), no_op).image_png == left.image_png
    assert served.generate(request(control(store, 4, scale=0.0)), no_op).image_png == \
        plain.image_png


def test_the_branch_beside_the_unet_gives_the_inline_result(pipe, store, controlnet_dir):
    inline = engine(pipe, store, controlnet_dir, parallel=False)
    beside = engine(pipe, store, controlnet_dir, parallel=True)
    ref = control(store, 20)
    assert np.abs(pixels(inline.generate(request(ref), no_op))
                  - pixels(beside.generate(request(ref), no_op))).max() <= 1


@pytest.mark.parametrize("step_cache", [NO_STEP_CACHE, StepCache(3)],
                         ids=["plain", "deepcache:3"])
def test_controlled_and_plain_jobs_share_a_batch_without_cross_talk(pipe, store, controlnet_dir,
                                                                    step_cache):
    served = engine(pipe, store, controlnet_dir, step_cache=step_cache)
    jobs = [request(control(store, 4)), request(), request(control(store, 36), seed=6),
            request(control(store, 36, scale=0.5), seed=7)]
    alone = [served.generate(job, no_op) for job in jobs]
    batch = [served.begin(job, no_op) for job in jobs]
    while not batch[0].finished:
        assert served.advance(batch) == {}
    for trajectory, single in zip(batch, alone):
        assert np.abs(pixels(served.finish(trajectory)) - pixels(single)).max() <= 1

"""The diffusion engine: a diffusers Stable Diffusion pipeline and our own denoising loop.

We run the loop ourselves (prompt encoding, UNet, scheduler step, VAE decode all come from
diffusers) because approximate caching needs control the stock pipeline call does not give:
capture the latent after chosen steps, resume from step K on the original N-step grid, count
UNet calls, and stop at the next step when a job is cancelled.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

from core.errors import ModelLoadError
from core.jobs import JobRequest
from workers.builtin_models import resolve_model

log = logging.getLogger(__name__)

SCHEDULERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}

StepCallback = Callable[[int, int], None]
"""Called after each denoising step with (steps done, steps in this run); may raise to stop."""


@dataclass
class Generation:
    image_png: bytes
    unet_calls: int
    captured: dict[int, torch.Tensor] = field(default_factory=dict)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Engine:
    def __init__(self, pipe: StableDiffusionPipeline, scheduler: str, device: torch.device,
                 label: str) -> None:
        if scheduler not in SCHEDULERS:
            raise ModelLoadError(f"scheduler {scheduler!r} unknown (choose from {sorted(SCHEDULERS)})")
        self.pipe = pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
        self.scheduler_name = scheduler
        self.device = device
        self.label = label

    @classmethod
    def load(cls, model: str, scheduler: str, device: str, models_dir: Path,
             offline: bool) -> Engine:
        """Load ``model``: a built-in name (see builtin_models), a local directory, or a hub id."""
        torch_device = pick_device(device)
        dtype = torch.float16 if torch_device.type == "cuda" else torch.float32
        source, label = resolve_model(model, models_dir)
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                source, dtype=dtype, safety_checker=None, requires_safety_checker=False,
                local_files_only=offline or Path(source).is_dir())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load model {model!r}: {exc}") from exc
        log.info("loaded model %s on %s (%s, scheduler %s)", label, torch_device, dtype, scheduler)
        return cls(pipe, scheduler, torch_device, label)

    @property
    def latent_channels(self) -> int:
        return self.pipe.unet.config.in_channels

    def latent_shape(self, request: JobRequest) -> tuple[int, int, int, int]:
        factor = self.pipe.vae_scale_factor
        return (1, self.latent_channels, request.height // factor, request.width // factor)

    @torch.inference_mode()
    def generate(self, request: JobRequest, on_step: StepCallback,
                 capture_steps: frozenset[int] = frozenset()) -> Generation:
        """Full generation: ``request.steps`` steps from seeded noise.

        The latent after each step in ``capture_steps`` is returned in ``captured`` (on CPU).
        """
        generator = torch.Generator("cpu").manual_seed(request.seed)
        noise = torch.randn(self.latent_shape(request), generator=generator, dtype=torch.float32)
        self.scheduler.set_timesteps(request.steps, device=self.device)
        latents = noise.to(self.device, self.pipe.unet.dtype) * self.scheduler.init_noise_sigma
        return self._denoise(request, latents, 0, on_step, capture_steps)

    @torch.inference_mode()
    def resume(self, request: JobRequest, latent: torch.Tensor, start_step: int,
               on_step: StepCallback, capture_steps: frozenset[int] = frozenset()) -> Generation:
        """Run only steps start_step+1 .. N, on the original N-step grid, from the latent a
        generation had after ``start_step`` steps (possibly of another prompt); the latents
        after ``capture_steps`` come back as in ``generate``."""
        if not 0 < start_step < request.steps:
            raise ValueError(f"resume step {start_step} outside 1..{request.steps - 1}")
        self.scheduler.set_timesteps(request.steps, device=self.device)
        latents = latent.to(self.device, self.pipe.unet.dtype)
        return self._denoise(request, latents, start_step, on_step, capture_steps)

    def _denoise(self, request: JobRequest, latents: torch.Tensor, start_step: int,
                 on_step: StepCallback, capture_steps: frozenset[int]) -> Generation:
        pipe, scheduler = self.pipe, self.scheduler
        guided = request.guidance > 1.0
        cond, uncond = pipe.encode_prompt(request.prompt, self.device, 1, guided,
                                          negative_prompt=request.negative_prompt or None)
        embeddings = torch.cat([uncond, cond]) if guided else cond
        timesteps = scheduler.timesteps[start_step:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start_step)
        captured: dict[int, torch.Tensor] = {}
        total = len(timesteps)
        for index, t in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise_pred = pipe.unet(model_input, t, encoder_hidden_states=embeddings).sample
            if guided:
                noise_uncond, noise_cond = noise_pred.chunk(2)
                noise_pred = noise_uncond + request.guidance * (noise_cond - noise_uncond)
            latents = scheduler.step(noise_pred, t, latents).prev_sample
            steps_done = start_step + index + 1
            if steps_done in capture_steps:
                captured[steps_done] = latents.detach().to("cpu", torch.float32).clone()
            on_step(index + 1, total)
        return Generation(image_png=self._decode(latents), unet_calls=total, captured=captured)

    def _decode(self, latents: torch.Tensor) -> bytes:
        vae = self.pipe.vae
        image = vae.decode(latents / vae.config.scaling_factor).sample
        pil = self.pipe.image_processor.postprocess(image, output_type="pil")[0]
        buffer = io.BytesIO()
        pil.save(buffer, format="PNG")
        return buffer.getvalue()

"""The diffusion engine: a diffusers Stable Diffusion pipeline and our own denoising loop.

We run the loop ourselves (prompt encoding, UNet, scheduler step, VAE decode all come from
diffusers) because approximate caching needs control the stock pipeline call does not give:
capture the latent after chosen steps, resume from step K on the original N-step grid, count
UNet calls, stop at the next step when a job is cancelled, and give a resumed job whose seed
differs from the cached latent's its own picture (``Reseed``).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
)

from core.errors import ModelLoadError
from core.jobs import JobRequest
from core.plan import Reseed, SeedRule
from workers.builtin_models import resolve_model

log = logging.getLogger(__name__)

SCHEDULERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}
# The same grid with fresh noise injected at every step (SeedRule.STOCHASTIC_TAIL), and the
# keyword arguments its step takes besides the generator: DDIM with eta=1, Euler ancestral.
# (Euler's own s_churn adds noise without re-evaluating the UNet at the raised sigma, which
# leaves excess noise in the image; the ancestral step removes what it adds.)
STOCHASTIC_SCHEDULERS: dict[str, tuple[Any, dict[str, float]]] = {
    "ddim": (DDIMScheduler, {"eta": 1.0}), "euler": (EulerAncestralDiscreteScheduler, {})}

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
        stochastic, self.stochastic_step_kwargs = STOCHASTIC_SCHEDULERS[scheduler]
        self.stochastic_scheduler = stochastic.from_config(pipe.scheduler.config)
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

    def seed_noise(self, request: JobRequest, seed: int) -> torch.Tensor:
        """The initial noise (CPU, float32) a generation of ``request``'s shape with ``seed``
        starts from: how re-seeding recovers a cached latent's noise."""
        generator = torch.Generator("cpu").manual_seed(seed)
        return torch.randn(self.latent_shape(request), generator=generator, dtype=torch.float32)

    @torch.inference_mode()
    def generate(self, request: JobRequest, on_step: StepCallback,
                 capture_steps: frozenset[int] = frozenset()) -> Generation:
        """Full generation: ``request.steps`` steps from seeded noise.

        The latent after each step in ``capture_steps`` is returned in ``captured`` (on CPU).
        """
        noise = self.seed_noise(request, request.seed)
        self.scheduler.set_timesteps(request.steps, device=self.device)
        latents = noise.to(self.device, self.pipe.unet.dtype) * self.scheduler.init_noise_sigma
        return self._denoise(request, latents, 0, on_step, capture_steps)

    @torch.inference_mode()
    def resume(self, request: JobRequest, latent: torch.Tensor, start_step: int,
               on_step: StepCallback, capture_steps: frozenset[int] = frozenset(),
               reseed: Reseed | None = None) -> Generation:
        """Run only steps start_step+1 .. N, on the original N-step grid, from the latent a
        generation had after ``start_step`` steps (possibly of another prompt); the latents
        after the steps of ``capture_steps`` that this run takes come back as in ``generate``.

        ``reseed`` gives a job whose seed differs from the latent's (``reseed.source_seed``)
        its own picture, since the steps left are deterministic given the latent:
        NOISE_SWAP swaps the source seed's noise in the latent for the job's (no extra step);
        RENOISE noises the latent back to step ``reseed.run_from`` with the job's noise and
        runs from there (N - run_from UNet calls); STOCHASTIC_TAIL injects noise seeded by
        the job's seed at every remaining step. None, SAME_SEED and K_CAP resume as is.
        """
        if not 0 < start_step < request.steps:
            raise ValueError(f"resume step {start_step} outside 1..{request.steps - 1}")
        if reseed is None or reseed.rule in (SeedRule.SAME_SEED, SeedRule.K_CAP):
            self.scheduler.set_timesteps(request.steps, device=self.device)
            latents = latent.to(self.device, self.pipe.unet.dtype)
            return self._denoise(request, latents, start_step, on_step, capture_steps)
        rule, run_from = reseed.rule, reseed.run_from
        if not (0 <= run_from < start_step if rule is SeedRule.RENOISE else run_from == start_step):
            raise ValueError(f"{rule} from step {start_step} cannot run from step {run_from}")
        if rule is SeedRule.STOCHASTIC_TAIL:
            self.stochastic_scheduler.set_timesteps(request.steps, device=self.device)
            latents = latent.to(self.device, self.pipe.unet.dtype)
            noise = torch.Generator("cpu").manual_seed(request.seed)
            return self._denoise(request, latents, start_step, on_step, capture_steps, noise)
        self.scheduler.set_timesteps(request.steps, device=self.device)
        latents = latent.to(self.device, torch.float32)
        job_noise = self.seed_noise(request, request.seed).to(self.device)
        signal, level = self._noise_scales(start_step)
        if rule is SeedRule.NOISE_SWAP:
            source_noise = self.seed_noise(request, reseed.source_seed).to(self.device)
            latents = latents + level * (job_noise - source_noise)
        else:  # RENOISE: the forward process from step start_step back to run_from
            back_signal, back_level = self._noise_scales(run_from)
            scale = back_signal / signal
            latents = scale * latents + (back_level ** 2 - (scale * level) ** 2) ** 0.5 * job_noise
        return self._denoise(request, latents.to(self.pipe.unet.dtype), run_from, on_step,
                             capture_steps)

    def _noise_scales(self, step: int) -> tuple[float, float]:
        """(a, s) with the latent after ``step`` steps of the set grid = a * x0 + s * noise.

        That latent is the input of step ``step`` + 1, so it sits at that step's timestep.
        DDIM latents are variance-preserving: a = sqrt(abar_t), s = sqrt(1 - abar_t). Euler
        latents are sigma-scaled (x0 + sigma * noise): a = 1, s = sigma. (A generation's own
        step-0 latent is noise * init_noise_sigma, 0.2-0.4% more noise than s on SD's schedule.)
        """
        if self.scheduler_name == "ddim":
            abar = float(self.scheduler.alphas_cumprod[int(self.scheduler.timesteps[step])])
            return abar ** 0.5, (1.0 - abar) ** 0.5
        return 1.0, float(self.scheduler.sigmas[step])

    def _denoise(self, request: JobRequest, latents: torch.Tensor, start_step: int,
                 on_step: StepCallback, capture_steps: frozenset[int],
                 noise: torch.Generator | None = None) -> Generation:
        """Steps start_step+1 .. N; with ``noise``, the stochastic scheduler's steps, which
        draw their injected noise from it."""
        pipe = self.pipe
        scheduler = self.scheduler if noise is None else self.stochastic_scheduler
        step_kwargs = {} if noise is None else {**self.stochastic_step_kwargs, "generator": noise}
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
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
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

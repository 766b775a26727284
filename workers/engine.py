"""The diffusion engine: a diffusers Stable Diffusion pipeline and our own denoising loop.

We run the loop ourselves (prompt encoding, UNet, scheduler step, VAE decode all come from
diffusers) because approximate caching needs control the stock pipeline call does not give:
capture the latent after chosen steps, resume from step K on the original N-step grid, count
UNet calls, stop at the next step when a job is cancelled, give a resumed job whose seed
differs from the cached latent's its own picture (``Reseed``), let steps reuse the deep
features of an earlier step of the same job (the step cache, ``core.stepcache``), and give
each job of a batched UNet call its own LoRAs and ControlNet (``workers.lora``,
``workers.controlnet``).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from diffusers import (
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
)

from core.addons import active_from, control_key
from core.errors import ModelLoadError, ObjectMissing
from core.jobs import JobRequest
from core.plan import Reseed, SeedRule
from core.stepcache import NO_STEP_CACHE, OFF, StepCache
from workers.builtin_models import resolve_model
from workers.controlnet import (
    ControlBranch,
    ControlConfig,
    ControlledRows,
    Residuals,
    control_image,
    load_controlnets,
)
from workers.lora import Adapter, AdapterCache, AdapterConfig, LoraLayer, RowAdapters, wait_for
from workers.step_cache import SplitUNet

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

LatentSource = torch.Tensor | Callable[[], torch.Tensor]
"""A cached latent, or what fetches it: fetched only once the job has joined (on_join), so a
fetch that kills the worker counts as the job's delivery."""

JoinCallback = Callable[[], None] | None
"""Called as a job starts running (alone: at once; batched: when it joins a batch); may
raise to keep it from running."""


@dataclass
class Generation:
    image_png: bytes
    unet_calls: int
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    batch_peak: int = 1     # the most jobs that shared one of its UNet calls
    shallow_unet_calls: int = 0   # of unet_calls, those that reused cached deep features
    step_cache: str = OFF         # the step cache it ran with (core.stepcache spec)
    adapter_wait_s: float = 0.0   # time its steps waited for its LoRAs to load


@dataclass
class Trajectory:
    """One job's denoising run in progress: all the engine needs to advance it by one step,
    alone or in a batch with other jobs at other steps (each has its own scheduler, since
    schedulers keep per-run state such as Euler's step index)."""

    request: JobRequest
    scheduler: Any
    step_kwargs: dict[str, Any]
    latents: torch.Tensor
    embeddings: torch.Tensor          # [uncond, cond] with guidance, else [cond]
    timesteps: torch.Tensor           # the steps this run takes
    start_step: int
    on_step: StepCallback
    capture_steps: frozenset[int]
    done: int = 0
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    batch_peak: int = 1
    deep: torch.Tensor | None = None  # its deep features of its last whole-UNet step
    shallow_steps: int = 0
    loras: tuple[tuple[Future[Adapter], float], ...] = ()   # loading or loaded, with scales
    lora_from: int = 0                # the first step (of the N-step grid) they act at
    adapter_wait_s: float = 0.0
    control: tuple[str, torch.Tensor, float] | None = None  # ControlNet, image, scale

    @property
    def guided(self) -> bool:
        return self.request.guidance > 1.0

    @property
    def finished(self) -> bool:
        return self.done == len(self.timesteps)

    @property
    def rows(self) -> int:
        """The rows it adds to a UNet batch."""
        return 2 if self.guided else 1


class DenoisingEngine(Protocol):
    """What the generation code needs of an engine: ``Engine`` (one job at a time) or
    ``workers.batcher.BatchingEngine`` (many, one UNet call per step)."""

    label: str

    def latent_shape(self, request: JobRequest) -> tuple[int, int, int, int]: ...

    def generate(self, request: JobRequest, on_step: StepCallback,
                 capture_steps: frozenset[int] = ..., alone: bool = ...,
                 on_join: JoinCallback = ...) -> Generation: ...

    def resume(self, request: JobRequest, latent: LatentSource, start_step: int,
               on_step: StepCallback, capture_steps: frozenset[int] = ...,
               reseed: Reseed | None = ..., alone: bool = ...,
               on_join: JoinCallback = ...) -> Generation: ...


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Engine:
    def __init__(self, pipe: StableDiffusionPipeline, scheduler: str, device: torch.device,
                 label: str, step_cache: StepCache = NO_STEP_CACHE,
                 adapters: AdapterConfig | None = None,
                 controls: ControlConfig | None = None) -> None:
        if scheduler not in SCHEDULERS:
            raise ModelLoadError(f"scheduler {scheduler!r} unknown (choose from {sorted(SCHEDULERS)})")
        self.pipe = pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.scheduler_name = scheduler
        self.device = device
        self.label = label
        self.step_cache = step_cache
        self.lora = LoraLayer(pipe.unet) if adapters else None
        self.adapters = AdapterCache(adapters.fetch, device, pipe.unet.dtype,
                                     adapters.budget_bytes) if adapters else None
        self.lora_from = adapters.active_from if adapters else 0.0
        self.controls = controls
        self.control = ControlBranch(load_controlnets(controls.paths, device, pipe.unet.dtype),
                                     controls.parallel) if controls else None
        self.split = SplitUNet(pipe.unet, self.lora.narrowed if self.lora else None) \
            if step_cache.on or self.control else None

    @classmethod
    def load(cls, model: str, scheduler: str, device: str, models_dir: Path,
             offline: bool, step_cache: StepCache = NO_STEP_CACHE,
             adapters: AdapterConfig | None = None,
             controls: ControlConfig | None = None) -> Engine:
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
        log.info("loaded model %s on %s (%s, scheduler %s, step cache %s)", label, torch_device,
                 dtype, scheduler, step_cache.spec)
        return cls(pipe, scheduler, torch_device, label, step_cache, adapters, controls)

    @property
    def latent_channels(self) -> int:
        return self.pipe.unet.config.in_channels

    def resident_adapters(self) -> list[str]:
        """Content digests of the LoRAs held in memory (core.affinity)."""
        return self.adapters.resident() if self.adapters else []

    def latent_shape(self, request: JobRequest) -> tuple[int, int, int, int]:
        factor = self.pipe.vae_scale_factor
        return (1, self.latent_channels, request.height // factor, request.width // factor)

    def seed_noise(self, request: JobRequest, seed: int) -> torch.Tensor:
        """The initial noise (CPU, float32) a generation of ``request``'s shape with ``seed``
        starts from: how re-seeding recovers a cached latent's noise."""
        generator = torch.Generator("cpu").manual_seed(seed)
        return torch.randn(self.latent_shape(request), generator=generator, dtype=torch.float32)

    def generate(self, request: JobRequest, on_step: StepCallback,
                 capture_steps: frozenset[int] = frozenset(), alone: bool = True,
                 on_join: JoinCallback = None) -> Generation:
        """Full generation: ``request.steps`` steps from seeded noise.

        The latent after each step in ``capture_steps`` is returned in ``captured`` (on CPU).
        ``on_join`` is called as the job starts. (``alone``: this engine runs every job
        alone; workers.batcher has one that does not.)
        """
        if on_join:
            on_join()
        return self.run_alone(self.begin(request, on_step, capture_steps))

    def resume(self, request: JobRequest, latent: LatentSource, start_step: int,
               on_step: StepCallback, capture_steps: frozenset[int] = frozenset(),
               reseed: Reseed | None = None, alone: bool = True,
               on_join: JoinCallback = None) -> Generation:
        """Run only steps start_step+1 .. N, on the original N-step grid, from the latent a
        generation had after ``start_step`` steps (possibly of another prompt); the latents
        after the steps of ``capture_steps`` that this run takes come back as in ``generate``.
        See ``begin`` for ``reseed``."""
        if on_join:
            on_join()
        return self.run_alone(self.begin(request, on_step, capture_steps, latent, start_step,
                                         reseed))

    @torch.inference_mode()
    def begin(self, request: JobRequest, on_step: StepCallback,
              capture_steps: frozenset[int] = frozenset(), latent: LatentSource | None = None,
              start_step: int = 0, reseed: Reseed | None = None) -> Trajectory:
        """A job ready to advance: from seeded noise (``latent`` None) or from a cached
        ``latent`` after ``start_step`` steps.

        ``reseed`` gives a resumed job whose seed differs from the latent's
        (``reseed.source_seed``) its own picture, since the steps left are deterministic
        given the latent: NOISE_SWAP swaps the source seed's noise in the latent for the
        job's (no extra step); RENOISE noises the latent back to step ``reseed.run_from``
        with the job's noise and runs from there (N - run_from UNet calls); STOCHASTIC_TAIL
        injects noise seeded by the job's seed at every remaining step. None, SAME_SEED and
        K_CAP resume as is.
        """
        if latent is None:
            scheduler = self._scheduler(request.steps)
            noise = self.seed_noise(request, request.seed)
            latents = noise.to(self.device, self.pipe.unet.dtype) * scheduler.init_noise_sigma
            return self._trajectory(request, scheduler, {}, latents, 0, on_step, capture_steps)
        if not 0 < start_step < request.steps:
            raise ValueError(f"resume step {start_step} outside 1..{request.steps - 1}")
        if callable(latent):
            latent = latent()
        if reseed is None or reseed.rule in (SeedRule.SAME_SEED, SeedRule.K_CAP):
            return self._trajectory(request, self._scheduler(request.steps), {},
                                    latent.to(self.device, self.pipe.unet.dtype), start_step,
                                    on_step, capture_steps)
        rule, run_from = reseed.rule, reseed.run_from
        if not (0 <= run_from < start_step if rule is SeedRule.RENOISE else run_from == start_step):
            raise ValueError(f"{rule} from step {start_step} cannot run from step {run_from}")
        if rule is SeedRule.STOCHASTIC_TAIL:
            stochastic, kwargs = STOCHASTIC_SCHEDULERS[self.scheduler_name]
            scheduler = stochastic.from_config(self.pipe.scheduler.config)
            scheduler.set_timesteps(request.steps, device=self.device)
            injected = torch.Generator("cpu").manual_seed(request.seed)
            return self._trajectory(request, scheduler, {**kwargs, "generator": injected},
                                    latent.to(self.device, self.pipe.unet.dtype), start_step,
                                    on_step, capture_steps)
        scheduler = self._scheduler(request.steps)
        latents = latent.to(self.device, torch.float32)
        job_noise = self.seed_noise(request, request.seed).to(self.device)
        signal, level = self._noise_scales(scheduler, start_step)
        if rule is SeedRule.NOISE_SWAP:
            source_noise = self.seed_noise(request, reseed.source_seed).to(self.device)
            latents = latents + level * (job_noise - source_noise)
        else:  # RENOISE: the forward process from step start_step back to run_from
            back_signal, back_level = self._noise_scales(scheduler, run_from)
            scale = back_signal / signal
            latents = scale * latents + (back_level ** 2 - (scale * level) ** 2) ** 0.5 * job_noise
        return self._trajectory(request, scheduler, {}, latents.to(self.pipe.unet.dtype),
                                run_from, on_step, capture_steps)

    def _scheduler(self, steps: int) -> Any:
        scheduler = SCHEDULERS[self.scheduler_name].from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    def _noise_scales(self, scheduler: Any, step: int) -> tuple[float, float]:
        """(a, s) with the latent after ``step`` steps of the set grid = a * x0 + s * noise.

        That latent is the input of step ``step`` + 1, so it sits at that step's timestep.
        DDIM latents are variance-preserving: a = sqrt(abar_t), s = sqrt(1 - abar_t). Euler
        latents are sigma-scaled (x0 + sigma * noise): a = 1, s = sigma. (A generation's own
        step-0 latent is noise * init_noise_sigma, 0.2-0.4% more noise than s on SD's schedule.)
        """
        if self.scheduler_name == "ddim":
            abar = float(scheduler.alphas_cumprod[int(scheduler.timesteps[step])])
            return abar ** 0.5, (1.0 - abar) ** 0.5
        return 1.0, float(scheduler.sigmas[step])

    def _trajectory(self, request: JobRequest, scheduler: Any, step_kwargs: dict[str, Any],
                    latents: torch.Tensor, start_step: int, on_step: StepCallback,
                    capture_steps: frozenset[int]) -> Trajectory:
        guided = request.guidance > 1.0
        cond, uncond = self.pipe.encode_prompt(request.prompt, self.device, 1, guided,
                                               negative_prompt=request.negative_prompt or None)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start_step)
        loras: tuple[tuple[Future[Adapter], float], ...] = ()
        if request.loras:
            if self.adapters is None:
                raise ModelLoadError("this engine serves no LoRAs")
            loras = tuple((self.adapters.load(ref.digest), ref.scale) for ref in request.loras)
        return Trajectory(request, scheduler, step_kwargs, latents,
                          torch.cat([uncond, cond]) if guided else cond,
                          scheduler.timesteps[start_step:], start_step, on_step, capture_steps,
                          loras=loras, lora_from=active_from(request.steps, self.lora_from),
                          control=self._control(request))

    def _control(self, request: JobRequest) -> tuple[str, torch.Tensor, float] | None:
        ref = request.controlnet
        if ref is None:
            return None
        if self.controls is None or ref.name not in self.controls.paths:
            raise ModelLoadError(f"this engine serves no ControlNet {ref.name!r}")
        image = control_image(self.controls.fetch(control_key(ref.digest)), self.device,
                              self.pipe.unet.dtype)
        return ref.name, image, ref.scale

    def _row_adapters(self, batch: list[Trajectory]
                      ) -> tuple[list[RowAdapters], dict[int, BaseException]]:
        """Each row's adapters this step (a job waits here for a LoRA still loading once its
        step reaches ``lora_from``), and, by position, the jobs whose LoRA failed to load."""
        rows: list[RowAdapters] = []
        failed: dict[int, BaseException] = {}
        for position, trajectory in enumerate(batch):
            adapters: RowAdapters = ()
            if trajectory.loras and trajectory.start_step + trajectory.done >= trajectory.lora_from:
                try:
                    adapters, waited = wait_for(trajectory.loras)
                except ObjectMissing:   # that job fails alone, naming what it asked for
                    names = ", ".join(ref.name for ref in trajectory.request.loras)
                    failed[position] = ObjectMissing(
                        f"LoRA {names}: the file the job was accepted with is gone (deleted "
                        "or replaced since)")
                    continue
                except Exception as exc:  # noqa: BLE001 - the store is down: retried as such
                    failed[position] = exc
                    continue
                trajectory.adapter_wait_s += waited
            rows += [adapters] * trajectory.rows
        return rows, failed

    @torch.inference_mode()
    def advance(self, batch: list[Trajectory]) -> dict[int, BaseException]:
        """One denoising step for every trajectory of ``batch``, each at its own timestep,
        in one UNet call (their latents must have one shape). Returns, by position in
        ``batch``, the exceptions their step callbacks raised (a cancelled job) or their
        adapters' loads did: those stop; the others go on."""
        rows, stopped = self._row_adapters(batch)
        running = [position for position in range(len(batch)) if position not in stopped]
        if running:
            with self.lora.applied(rows) if self.lora else contextlib.nullcontext():
                stepped = self._step([batch[position] for position in running])
            stopped |= {running[index]: exc for index, exc in stepped.items()}
        return stopped

    def _step(self, batch: list[Trajectory]) -> dict[int, BaseException]:
        inputs, timesteps = [], []
        for trajectory in batch:
            t = trajectory.timesteps[trajectory.done]
            rows = torch.cat([trajectory.latents] * trajectory.rows)
            inputs.append(trajectory.scheduler.scale_model_input(rows, t))
            timesteps.append(t.reshape(1).to(torch.float32).expand(trajectory.rows))
        text = torch.cat([trajectory.embeddings for trajectory in batch])
        sample, times = torch.cat(inputs), torch.cat(timesteps)
        residuals = self._residuals(batch, sample, times, text)
        if self.split is None or (residuals is None and not self.step_cache.on):
            noise_pred = self.pipe.unet(sample, times, encoder_hidden_states=text).sample
        else:
            noise_pred = self._cached_step(batch, sample, times, text, residuals)
        stopped: dict[int, BaseException] = {}
        predictions = noise_pred.split([trajectory.rows for trajectory in batch])
        for position, (trajectory, predicted) in enumerate(zip(batch, predictions)):
            if trajectory.guided:
                uncond, cond = predicted.chunk(2)
                predicted = uncond + trajectory.request.guidance * (cond - uncond)
            t = trajectory.timesteps[trajectory.done]
            trajectory.batch_peak = max(trajectory.batch_peak, len(batch))
            trajectory.latents = trajectory.scheduler.step(
                predicted, t, trajectory.latents, **trajectory.step_kwargs).prev_sample
            trajectory.done += 1
            steps_done = trajectory.start_step + trajectory.done
            if steps_done in trajectory.capture_steps:
                trajectory.captured[steps_done] = \
                    trajectory.latents.detach().to("cpu", torch.float32).clone()
            try:
                trajectory.on_step(trajectory.done, len(trajectory.timesteps))
            except Exception as exc:  # the job's own business (cancelled): it stops alone
                stopped[position] = exc
        return stopped

    def _residuals(self, batch: list[Trajectory], sample: torch.Tensor, timesteps: torch.Tensor,
                   text: torch.Tensor) -> Callable[[], Residuals] | None:
        """The controlled rows' ControlNet residuals, started (None when no row has one)."""
        controlled: ControlledRows = []
        row = 0
        for trajectory in batch:
            if trajectory.control is not None:
                name, image, scale = trajectory.control
                controlled.append((list(range(row, row + trajectory.rows)), name, image, scale))
            row += trajectory.rows
        if not controlled or self.control is None:
            return None
        return self.control.start(sample, timesteps, text, controlled)

    def _cached_step(self, batch: list[Trajectory], sample: torch.Tensor,
                     timesteps: torch.Tensor, text: torch.Tensor,
                     residuals: Callable[[], Residuals] | None = None) -> torch.Tensor:
        """The UNet call with the step cache: a trajectory at a whole step of its schedule
        (or without features yet) refreshes its deep features, the others reuse theirs;
        with ControlNet residuals joined (without the step cache every row is whole)."""
        assert self.split is not None
        whole = [t.deep is None or self.step_cache.full(t.start_step + t.done, t.start_step,
                                                        t.request.steps) for t in batch]
        rows = torch.tensor([w for t, w in zip(batch, whole) for _ in range(t.rows)],
                            device=sample.device)
        cached = [t.deep for t, w in zip(batch, whole) if not w and t.deep is not None]
        noise_pred, deep = self.split(sample, timesteps, text, rows,
                                      torch.cat(cached) if cached else None, residuals)
        if not self.step_cache.on:
            return noise_pred
        for trajectory, refreshed, features in zip(batch, whole,
                                                   deep.split([t.rows for t in batch])):
            if refreshed:
                trajectory.deep = features.clone()  # not a view holding the batch's features
            else:
                trajectory.shallow_steps += 1
        return noise_pred

    @torch.inference_mode()
    def finish(self, trajectory: Trajectory) -> Generation:
        """The finished trajectory's image."""
        return Generation(image_png=self._decode(trajectory.latents),
                          unet_calls=len(trajectory.timesteps), captured=trajectory.captured,
                          batch_peak=trajectory.batch_peak,
                          shallow_unet_calls=trajectory.shallow_steps,
                          step_cache=self.step_cache.spec,
                          adapter_wait_s=trajectory.adapter_wait_s)

    def run_alone(self, trajectory: Trajectory) -> Generation:
        while not trajectory.finished:
            if stopped := self.advance([trajectory]):
                raise stopped[0]
        return self.finish(trajectory)

    def _decode(self, latents: torch.Tensor) -> bytes:
        vae = self.pipe.vae
        image = vae.decode(latents / vae.config.scaling_factor).sample
        pil = self.pipe.image_processor.postprocess(image, output_type="pil")[0]
        buffer = io.BytesIO()
        pil.save(buffer, format="PNG")
        return buffer.getvalue()

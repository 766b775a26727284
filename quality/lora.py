"""Train scene-world LoRAs for the served scene model, so add-ons have a measurable effect.

    python -m quality.lora --style palette-swap --out quality/weights/loras/palette-swap.safetensors

A style is a rule that changes a scene while its caption stays the same: ``palette-swap``
paints red as blue, green as purple, yellow as orange and back; ``squares`` draws every
object as a square. The adapter learns, from images of the changed scene under the
unchanged caption, to draw the change; ``quality.addons`` measures how often the evaluator
reads the changed scene in what a job with the adapter drew. Training uses the serving hook
(``workers.lora.LoraLayer``), so what is trained is exactly what GPU workers apply. The UNet
and text encoder stay frozen; loss, schedule and batches are the world model's. A
checkpoint beside the output (OUT.ckpt) lets an interrupted run resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from quality.evaluator import to_tensor
from quality.scenes import Scene, caption, render, sample_scene
from workers.lora import Adapter, LoraLayer, adapter_file

_SWAPS = {"red": "blue", "blue": "red", "green": "purple", "purple": "green",
          "yellow": "orange", "orange": "yellow"}


def _palette_swap(scene: Scene) -> Scene:
    return Scene(_SWAPS.get(scene.background, scene.background),
                 tuple(dataclasses.replace(item, colour=_SWAPS.get(item.colour, item.colour))
                       for item in scene.objects))


def _squares(scene: Scene) -> Scene:
    return Scene(scene.background, tuple(dataclasses.replace(item, shape="square")
                                         for item in scene.objects))


STYLES: dict[str, Callable[[Scene], Scene]] = {"palette-swap": _palette_swap,
                                               "squares": _squares}


def load_scene_pipeline():
    from diffusers import StableDiffusionPipeline

    from workers.builtin_models import SCENE_MODEL_DIR

    pipe = StableDiffusionPipeline.from_pretrained(SCENE_MODEL_DIR, dtype=torch.float32,
                                                   safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def new_adapter(layer: LoraLayer, rank: int, seed: int) -> Adapter:
    """A (rank) pair per target: A small random, B zero, so training starts at the base."""
    generator = torch.Generator().manual_seed(seed)
    pairs = {}
    for name, (out_features, in_features) in layer.targets.items():
        a = torch.randn(rank, in_features, generator=generator) / in_features ** 0.5
        pairs[name] = (a.requires_grad_(), torch.zeros(out_features, rank, requires_grad=True))
    return Adapter("training", pairs)


def train(style: str, out: Path, steps: int, rank: int, seed: int, batch_size: int = 32,
          progress: bool = True) -> Path:
    from quality.world_model import encode_text, min_snr_weights, noise_schedule, save_checkpoint

    change = STYLES[style]
    pipe = load_scene_pipeline()
    unet, vae = pipe.unet.requires_grad_(False), pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    layer = LoraLayer(unet)
    adapter = new_adapter(layer, rank, seed)
    parameters = [t for pair in adapter.pairs.values() for t in pair]
    optimiser = torch.optim.AdamW(parameters, lr=2e-3, weight_decay=0.0)
    checkpoint, start = out.with_suffix(".ckpt"), 0
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)
        with torch.no_grad():
            for mine, kept in zip(parameters, saved["parameters"]):
                mine.copy_(kept)
        optimiser.load_state_dict(saved["optimiser"])
        start = saved["step"]
    rng = random.Random(seed + start)
    scheduler, _ = noise_schedule()
    scale = vae.config.scaling_factor
    for step in tqdm(range(start, steps), initial=start, total=steps, desc=f"LoRA {style}",
                     disable=not progress):
        scenes = [sample_scene(rng) for _ in range(batch_size)]
        pixels = to_tensor(np.stack([render(change(scene), jitter=rng) for scene in scenes]))
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.mean * scale
            text = encode_text(pipe.tokenizer, pipe.text_encoder,
                               [caption(scene, rng) for scene in scenes])
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with layer.applied([((adapter, 1.0),)] * batch_size):
            predicted = unet(noisy, timesteps, text).sample
        target = scheduler.get_velocity(latents, noise, timesteps)
        per_sample = (predicted - target).pow(2).mean(dim=(1, 2, 3))
        loss = (min_snr_weights(scheduler, timesteps) * per_sample).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            save_checkpoint({"parameters": [p.detach() for p in parameters],
                             "optimiser": optimiser.state_dict(), "step": step + 1}, checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(adapter_file(adapter.pairs))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--style", choices=sorted(STYLES), required=True)
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.monotonic()
    path = train(args.style, Path(args.out), args.steps, args.rank, args.seed)
    print(f"{args.style} adapter written to {path} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

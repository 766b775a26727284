"""Train a layout ControlNet for the scene model: objects go where a layout map puts them.

    python -m quality.controlnet --out quality/weights/controlnet-layout

A layout map is the scene's object silhouettes, white on black, at the image's size. The
world's captions name only left, centre or right; where exactly (the height, the offset)
is the renderer's jitter, which the caption does not say, so without the map the model
places objects anywhere its training spread them, and with it they go where the map says.
``placement`` scores that: the intersection over union of the drawn objects (pixels that
differ from the background) with the map. The ControlNet is diffusers' ControlNetModel made
from the scene UNet (its encoder copied, zero convolutions out), trained with the UNet, text
encoder and VAE frozen on the world model's loss. A checkpoint in OUT (ckpt.pt) lets an
interrupted run resume; the result is an ordinary diffusers ControlNet directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from quality.evaluator import to_tensor
from quality.scenes import Scene, caption, render, sample_scene

SCENE_CONTROLNET_DIR = Path(__file__).resolve().parent / "weights" / "controlnet-layout"


def layout_map(scene: Scene, jitter_seed: int) -> np.ndarray:
    """The scene's objects as white silhouettes on black, placed with the jitter that
    ``render(scene, random.Random(jitter_seed))`` draws them with."""
    silhouettes = Scene("black", tuple(dataclasses.replace(item, colour="white")
                                       for item in scene.objects))
    return render(silhouettes, random.Random(jitter_seed))


def drawn_mask(image: np.ndarray, tolerance: float = 60.0) -> np.ndarray:
    """Pixels of ``image`` (H x W x 3) that differ from its background, taken as the median
    colour of its border."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(float)
    background = np.median(border, axis=0)
    return np.linalg.norm(image.astype(float) - background, axis=-1) > tolerance


def placement(image: np.ndarray, layout: np.ndarray) -> float:
    """Intersection over union of the drawn objects with the layout's silhouettes."""
    drawn, wanted = drawn_mask(image), layout[..., 0] > 127
    union = np.logical_or(drawn, wanted).sum()
    return float(np.logical_and(drawn, wanted).sum() / union) if union else 1.0


def train(out: Path, steps: int, seed: int, batch_size: int = 32, progress: bool = True) -> Path:
    from diffusers import ControlNetModel

    from quality.lora import load_scene_pipeline
    from quality.world_model import (
        encode_text,
        learning_rate,
        min_snr_weights,
        noise_schedule,
        save_checkpoint,
    )

    pipe = load_scene_pipeline()
    unet, vae = pipe.unet.requires_grad_(False), pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64))
    optimiser = torch.optim.AdamW(controlnet.parameters(), lr=1e-3)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint, start = out / "ckpt.pt", 0
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)
        controlnet.load_state_dict(saved["controlnet"])
        optimiser.load_state_dict(saved["optimiser"])
        start = saved["step"]
    rng = random.Random(seed + start)
    scheduler, _ = noise_schedule()
    scale = vae.config.scaling_factor
    controlnet.train()
    for step in tqdm(range(start, steps), initial=start, total=steps, desc="ControlNet layout",
                     disable=not progress):
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(step, steps)
        scenes = [sample_scene(rng) for _ in range(batch_size)]
        jitters = [rng.randrange(2**31) for _ in scenes]
        pixels = to_tensor(np.stack([render(s, random.Random(j)) for s, j in zip(scenes, jitters)]))
        layouts = to_tensor(np.stack([layout_map(s, j) for s, j in zip(scenes, jitters)]))
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.mean * scale
            text = encode_text(pipe.tokenizer, pipe.text_encoder,
                               ["" if rng.random() < 0.1 else caption(s, rng) for s in scenes])
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        down, mid = controlnet(noisy, timesteps, text, controlnet_cond=(layouts + 1) / 2,
                               return_dict=False)
        predicted = unet(noisy, timesteps, text, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample
        target = scheduler.get_velocity(latents, noise, timesteps)
        per_sample = (predicted - target).pow(2).mean(dim=(1, 2, 3))
        loss = (min_snr_weights(scheduler, timesteps) * per_sample).mean()
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimiser.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            save_checkpoint({"controlnet": controlnet.state_dict(),
                             "optimiser": optimiser.state_dict(), "step": step + 1}, checkpoint)
    controlnet.eval().to(torch.float16).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(SCENE_CONTROLNET_DIR),
                        help="the ControlNet directory to write (checkpoint in OUT/ckpt.pt)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.monotonic()
    path = train(Path(args.out), args.steps, args.seed)
    print(f"layout ControlNet written to {path} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

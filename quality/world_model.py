"""Train a Stable-Diffusion-architecture text-to-image model on the scene world, on a CPU.

    python -m quality.world_model --out ~/.cache/t2i/models/scene-sd

The same component classes as SD 1.5 at a small width: a CLIP text encoder (word-level
tokenizer over the world's vocabulary), a cross-attention UNet2DConditionModel, a KL
autoencoder (64x64 images, 16x16x4 latents) and the SD noise schedule. Stage 1 trains the
autoencoder, stage 2 the UNet and text encoder on its latents (captions dropped 10% of the
time, for classifier-free guidance). Two choices make captions bind on a CPU: the loss is
min-SNR weighted, so the near-clean timesteps (where the caption barely matters) do not
drown the rest, and the UNet attends to text at 8x8 and 4x4 only, which makes a step twice
as cheap as attending at 16x16 as well. The schedule has zero terminal SNR and the UNet
predicts v (Lin et al. 2024): on SD's own schedule the noisiest training latent still leaks
where the objects are, so a model learns to put them where the sampling noise happens to
suggest and ignores "left" and "right"; with no leak, layout has to come from the caption.
The served weights are an exponential moving average of the trained ones, and the learning
rate warms up and decays on a cosine. Checkpoints are kept in the output folder, so an
interrupted run resumes. The result is an ordinary diffusers model directory: set
``T2I_MODEL`` to it and the workers load it like any model.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from quality.evaluator import to_tensor
from quality.scenes import (
    BACKGROUND_TEMPLATES,
    COLOURS,
    POSITION_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
    caption,
    render,
    sample_scene,
)
from workers.builtin_models import SD1_NOISE_SCHEDULE

SPECIAL = ("<|startoftext|>", "<|endoftext|>")
TEXT_WIDTH = 64
MAX_TOKENS = 40   # the longest caption is 34 tokens


def world_words() -> list[str]:
    """Every word a caption can use."""
    phrases = [*COLOURS, "a", "and", *BACKGROUND_TEMPLATES,
               *(w for words in (*SHAPE_WORDS.values(), *SIZE_WORDS.values(),
                                 *POSITION_WORDS.values()) for w in words)]
    return sorted({word for phrase in phrases for word in re.findall(r"[a-z]+", phrase)})


def world_tokenizer():
    """A CLIP tokenizer that knows the world's words as whole tokens: byte symbols, plus BPE
    merges that build each word left to right. Any other text still tokenizes, by bytes."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab_list = [*symbols, *(s + "</w>" for s in symbols), *SPECIAL]
    merges: list[tuple[str, str]] = []
    for word in world_words():
        pieces = [*word[:-1], word[-1] + "</w>"]
        built = pieces[0]
        for piece in pieces[1:]:
            merges.append((built, piece))
            built += piece
            vocab_list.append(built)
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocab_list))}
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), bos_token=SPECIAL[0],
                         eos_token=SPECIAL[1], unk_token=SPECIAL[1], pad_token=SPECIAL[1],
                         model_max_length=MAX_TOKENS)


def build_components(seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = world_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
                        down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4,
                                block_out_channels=(32, 64, 64), layers_per_block=1,
                                cross_attention_dim=TEXT_WIDTH, attention_head_dim=8,
                                norm_num_groups=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                  "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                                "UpBlock2D"))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    return tokenizer, vae, unet, text_encoder


# SD 1.x's betas rescaled to zero terminal SNR, v-prediction, and a grid that starts at the
# last timestep (the "trailing" spacing that zero terminal SNR needs).
SCENE_SCHEDULE = {**SD1_NOISE_SCHEDULE, "prediction_type": "v_prediction",
                  "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
EMA_DECAY = 0.999
WARMUP_STEPS = 250


def noise_schedule():
    """DDPM for training, DDIM for sampling (the serving default), on one schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler

    return (DDPMScheduler(**SCENE_SCHEDULE),
            DDIMScheduler(**SCENE_SCHEDULE, clip_sample=False, set_alpha_to_one=False,
                          steps_offset=1))


def batch(rng: random.Random, size: int) -> tuple[torch.Tensor, list[str]]:
    scenes = [sample_scene(rng) for _ in range(size)]
    images = np.stack([render(scene, jitter=rng) for scene in scenes])
    return to_tensor(images), [caption(scene, rng) for scene in scenes]


def train_autoencoder(vae, steps: int, rng: random.Random, progress: bool) -> None:
    optimiser = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    vae.train()
    for _ in tqdm(range(steps), desc="stage 1: autoencoder", disable=not progress):
        pixels, _ = batch(rng, 16)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = torch.nn.functional.mse_loss(reconstruction, pixels) + 1e-6 * posterior.kl().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    vae.eval()


@torch.no_grad()
def latent_scale(vae, rng: random.Random) -> float:
    """SD's scaling factor: latents times it have unit variance."""
    pixels, _ = batch(rng, 256)
    return float(1.0 / vae.encode(pixels).latent_dist.sample().std())


def encode_text(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weights on the v loss: min(SNR + 1, gamma + 1) / (SNR + 1), i.e. the
    x0 error weighted min(SNR + 1, gamma + 1). Like min-SNR (Hang et al. 2023) it keeps the
    near-clean timesteps from drowning the rest; the +1 keeps pure noise (SNR 0, where the
    layout is decided from the caption alone) at full weight instead of none."""
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    snr_plus_one = 1 / (1 - alpha_bar)
    return snr_plus_one.clamp(max=gamma + 1) / snr_plus_one


def save_checkpoint(state: dict, path: Path) -> None:
    """Write ``state`` beside ``path`` and move it in, so an interrupted save leaves the
    previous checkpoint whole (every training command here resumes from its checkpoint)."""
    torch.save(state, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def learning_rate(step: int, steps: int, peak: float = 1e-3) -> float:
    """Linear warm-up, then a cosine down to 5% of the peak at the last step."""
    if step < WARMUP_STEPS:
        return peak * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return peak * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(1.0, progress))))


def train_denoiser(vae, trained: torch.nn.ModuleDict, averaged: torch.nn.ModuleDict, tokenizer,
                   steps: int, start: int, rng: random.Random, checkpoint, progress: bool,
                   batch_size: int = 32) -> None:
    """Train ``trained`` (unet, text_encoder) for steps start..steps; ``averaged`` keeps
    their exponential moving average."""
    scheduler, _ = noise_schedule()
    unet, text_encoder = trained["unet"], trained["text_encoder"]
    parameters: list[torch.Tensor] = list(trained.parameters())
    optimiser = torch.optim.AdamW(parameters, lr=learning_rate(start, steps))
    trained.train()
    scale = vae.config.scaling_factor
    for step in tqdm(range(start, steps), initial=start, total=steps, desc="stage 2: denoiser",
                     disable=not progress):
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(step, steps)
        pixels, captions = batch(rng, batch_size)
        captions = ["" if rng.random() < 0.1 else text for text in captions]
        with torch.no_grad():  # the posterior mean: its sampling noise is not content
            latents = vae.encode(pixels).latent_dist.mean * scale
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        predicted = unet(noisy, timesteps, encode_text(tokenizer, text_encoder, captions)).sample
        target = scheduler.get_velocity(latents, noise, timesteps)
        per_sample = (predicted - target).pow(2).mean(dim=(1, 2, 3))
        loss = (min_snr_weights(scheduler, timesteps) * per_sample).mean()
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(averaged.parameters()), parameters, 1 - EMA_DECAY)
        if (step + 1) % 250 == 0 or step + 1 == steps:
            checkpoint(step + 1)
    trained.eval()


def assemble(tokenizer, vae, unet, text_encoder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=noise_schedule()[1], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def train(out: Path, autoencoder_steps: int, denoiser_steps: int, seed: int,
          progress: bool = True) -> Path:
    """Train (or resume) into ``out``/{stage1.pt, stage2.pt}, then write the diffusers model
    to ``out``/model; returns that directory."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, vae, unet, text_encoder = build_components(seed)
    rng = random.Random(seed)
    stage1 = out / "stage1.pt"
    if stage1.exists():
        vae.load_state_dict(torch.load(stage1, weights_only=True))
    else:
        train_autoencoder(vae, autoencoder_steps, rng, progress)
        vae.register_to_config(scaling_factor=latent_scale(vae, rng))
        torch.save(vae.state_dict(), stage1)
        (out / "scale.json").write_text(json.dumps(vae.config.scaling_factor))
    vae.register_to_config(scaling_factor=json.loads((out / "scale.json").read_text()))
    vae.eval().requires_grad_(False)
    trained = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    averaged = copy.deepcopy(trained).requires_grad_(False)
    stage2, start = out / "stage2.pt", 0
    if stage2.exists():
        saved = torch.load(stage2, weights_only=True)
        trained.load_state_dict(saved["trained"])
        averaged.load_state_dict(saved["averaged"])
        start = saved["step"]
        rng = random.Random(seed + start)  # new scenes after a resume, not a replay

    def checkpoint(step: int) -> None:
        save_checkpoint({"trained": trained.state_dict(), "averaged": averaged.state_dict(),
                         "step": step}, stage2)

    if start < denoiser_steps:
        train_denoiser(vae, trained, averaged, tokenizer, denoiser_steps, start, rng,
                       checkpoint, progress)
    model_dir = out / "model"
    # The average is what is served, in fp16 (half the size; loaders upcast on CPU);
    # checkpoints stay fp32.
    assemble(tokenizer, vae, averaged["unet"].eval(), averaged["text_encoder"].eval()).to(
        dtype=torch.float16).save_pretrained(model_dir)
    return model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path.home() / ".cache/t2i/models/scene-sd"),
                        help="training folder (checkpoints; the model goes to OUT/model)")
    parser.add_argument("--autoencoder-steps", type=int, default=1500)
    parser.add_argument("--denoiser-steps", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.monotonic()
    model_dir = train(Path(args.out).expanduser(), args.autoencoder_steps, args.denoiser_steps,
                      args.seed)
    print(f"model written to {model_dir} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

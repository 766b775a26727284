"""A tiny Stable-Diffusion-architecture TEST model, built from config with fixed seeds.

No weights can be downloaded here, so tests and the embedded default use this: the same
component classes as SD 1.5 (CLIP text encoder, cross-attention UNet, KL autoencoder with an
8x downsampling, DDIM schedule) at a fraction of the width. Its weights are random, so its
images are noise: it exercises the serving path, not image quality. It is written to a local
directory once and then loaded from there like any other model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

TINY_MODEL_NAME = "tiny-sd"
TINY_MODEL_LABEL = "tiny-sd (TEST model: random weights, built from config)"
# The scene-world model, trained here by quality.world_model and committed (fp16, ~4 MB).
SCENE_MODEL_DIR = Path(__file__).resolve().parent.parent / "quality" / "weights" / "scene-sd"
SCENE_MODEL_LABEL = "scene-sd (trained on the scene world by quality.world_model)"
_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _byte_level_tokenizer():
    """A CLIP tokenizer whose vocabulary is the 256 byte symbols (with and without the
    end-of-word mark) and no merges: every prompt tokenizes, nothing is downloaded."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab_list = symbols + [s + "</w>" for s in symbols] + list(_SPECIAL_TOKENS)
    vocab = {token: index for index, token in enumerate(vocab_list)}
    return CLIPTokenizer(vocab=vocab, merges=[], bos_token=_SPECIAL_TOKENS[0],
                         eos_token=_SPECIAL_TOKENS[1], unk_token=_SPECIAL_TOKENS[1],
                         pad_token=_SPECIAL_TOKENS[1], model_max_length=77)


def build_tiny_pipeline(seed: int = 0):
    """Build the tiny pipeline in memory (deterministic for a given seed)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _byte_level_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=64,
        in_channels=4, out_channels=4, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 32, 32), norm_num_groups=8, layers_per_block=1,
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    # The SD 1.x noise schedule.
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def ensure_tiny_model(models_dir: Path) -> Path:
    """Write the tiny model under ``models_dir`` once; return its directory.

    Written to a temporary directory and renamed, so processes starting together never
    load a half-written model.
    """
    target = models_dir / TINY_MODEL_NAME
    if (target / "model_index.json").exists():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{TINY_MODEL_NAME}-", dir=models_dir))
    try:
        build_tiny_pipeline().save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(model: str, models_dir: Path) -> tuple[str, str]:
    """(where to load from, label for job records) for a T2I_MODEL value."""
    if model == "tiny":
        return str(ensure_tiny_model(models_dir)), TINY_MODEL_LABEL
    if model == "scene":
        return str(SCENE_MODEL_DIR), SCENE_MODEL_LABEL
    return model, model

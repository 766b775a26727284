"""Models built from config with fixed seeds, for where no weights can be downloaded.

Both use SD 1.5's component classes (CLIP text encoder, cross-attention UNet, KL autoencoder
with an 8x downsampling, the SD 1.x DDIM schedule) and a byte-level tokenizer; their weights
are random, so their images are noise: they exercise the serving path, not image quality.

- ``tiny``: a fraction of SD 1.5's width; what tests and CPU runs use.
- ``sd15-random``: SD 1.5's own UNet, VAE and text-encoder configs (859.5M + 83.7M + 85.5M
  parameters; the text encoder's vocabulary is the tokenizer's 514 symbols instead of 49,408,
  which changes a table lookup, not the compute), so a GPU measures SD 1.5's cost per step.

Each is written to a local directory once (sd15-random in fp16, 2.1 GB) and then loaded from
there like any other model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachemgr.ktable import KTable
from core.addons import parse_controlnets
from core.stepcache import StepCache

# The scene-world model, trained here by quality.world_model and committed (fp16, ~4 MB).
SCENE_MODEL_DIR = Path(__file__).resolve().parent.parent / "quality" / "weights" / "scene-sd"
SCENE_MODEL_LABEL = "scene-sd (trained on the scene world by quality.world_model)"
_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
# The SD 1.x noise schedule; quality.world_model trains the scene model on it.
SD1_NOISE_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                      "num_train_timesteps": 1000}


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


def sd1_ddim_scheduler():
    """DDIM sampling on the SD 1.x schedule (the serving default)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD1_NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1)


def _assemble(seed: int, unet: dict[str, Any], vae: dict[str, Any], text_encoder: dict[str, Any]):
    """An SD-1.x pipeline from the three components' configs (random weights, seeded)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _byte_level_tokenizer()
    torch.manual_seed(seed)
    unet_model = UNet2DConditionModel(in_channels=4, out_channels=4, **unet)
    encoder_blocks = len(vae["block_out_channels"])
    vae_model = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                              down_block_types=("DownEncoderBlock2D",) * encoder_blocks,
                              up_block_types=("UpDecoderBlock2D",) * encoder_blocks, **vae)
    text_model = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=77, layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **text_encoder))
    return StableDiffusionPipeline(vae=vae_model, text_encoder=text_model, tokenizer=tokenizer,
                                   unet=unet_model, scheduler=sd1_ddim_scheduler(),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_tiny_pipeline(seed: int = 0):
    """The tiny pipeline in memory (deterministic for a given seed)."""
    return _assemble(
        seed,
        unet=dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=64,
                  cross_attention_dim=32, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
        vae=dict(block_out_channels=(8, 16, 32, 32), norm_num_groups=8, layers_per_block=1),
        text_encoder=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4))


# SD 1.5's UNet: diffusers' defaults are its blocks and widths; these the rest.
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


def build_sd15_sized_pipeline(seed: int = 0):
    """SD 1.5's architecture at full size (the text encoder is CLIP ViT-L/14's), random
    weights."""
    return _assemble(
        seed,
        unet=SD15_UNET,
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512),
        text_encoder=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, projection_dim=768))


@dataclass(frozen=True)
class BuiltModel:
    directory: str                 # its folder under the models directory
    label: str                     # what job records name
    build: Callable[[], Any]
    half_on_disk: bool             # saved in fp16 (workers load fp16 on GPU, fp32 on CPU)


BUILT_MODELS = {
    "tiny": BuiltModel("tiny-sd", "tiny-sd (TEST model: random weights, built from config)",
                       build_tiny_pipeline, half_on_disk=False),
    "sd15-random": BuiltModel("sd15-random",
                              "sd15-random (SD-1.5-sized TEST model: random weights, built "
                              "from config)", build_sd15_sized_pipeline, half_on_disk=True),
}


def ensure_built(model: BuiltModel, models_dir: Path) -> Path:
    """Write ``model`` under ``models_dir`` once; return its directory.

    Written to a temporary directory and renamed, so processes starting together never
    load a half-written model.
    """
    target = models_dir / model.directory
    if (target / "model_index.json").exists():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model.directory}-", dir=models_dir))
    try:
        pipe = model.build()
        if model.half_on_disk:
            import torch
            pipe = pipe.to(torch.float16)
        pipe.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# The embedder the scene model is served with under 'auto': its own text encoder, whose
# similarity tells safe reuse from unsafe better than MiniLM's (AUC 0.54-0.70 per K against
# 0.31-0.54, bench/results/k-profile-scene.json), and where the tables quality.profile
# derived for it live, one per embedder (README, Quality harness).
SCENE_EMBEDDER = "clip"
SCENE_K_TABLES = SCENE_MODEL_DIR.parent


def cache_embedder(setting: str, model: str) -> str:
    """T2I_EMBEDDER resolved: 'auto' is the embedder the model was profiled best with (the
    scene model's own text encoder), else MiniLM."""
    if setting != "auto":
        return setting
    return SCENE_EMBEDDER if model == "scene" else "minilm"


def cache_k_table(setting: str, model: str, embedder: str) -> str:
    """T2I_K_TABLE resolved: 'auto' is the table profiled for this model and embedder where
    the project has one (the scene model's, per embedder), else the reference table."""
    if setting != "auto":
        return setting
    profiled = SCENE_K_TABLES / f"k-table-scene-{embedder}.json"
    return str(profiled) if model == "scene" and profiled.is_file() else "reference"


def cache_step_cache(setting: str, table: KTable) -> StepCache:
    """T2I_STEP_CACHE resolved: 'auto' is what the K table names (its profile's choice: the
    scene model's tables name deepcache:3:0.2, bench/results/step-cache-profile-scene.json;
    the reference table names none)."""
    return StepCache.parse(table.step_cache if setting == "auto" else setting)


def served_controlnets(setting: str, model: str) -> dict[str, str]:
    """T2I_CONTROLNETS resolved: 'auto' is the layout ControlNet trained for the scene model
    (quality.controlnet) when serving it, else none."""
    if setting != "auto":
        return parse_controlnets(setting)
    layout = SCENE_MODEL_DIR.parent / "controlnet-layout"
    return {"layout": str(layout)} if model == "scene" and (layout / "config.json").is_file() \
        else {}


def resolve_model(model: str, models_dir: Path) -> tuple[str, str]:
    """(where to load from, label for job records) for a T2I_MODEL value."""
    if model in BUILT_MODELS:
        built = BUILT_MODELS[model]
        return str(ensure_built(built, models_dir)), built.label
    if model == "scene":
        return str(SCENE_MODEL_DIR), SCENE_MODEL_LABEL
    return model, model

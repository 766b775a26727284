"""The built-from-config models: sd15-random must cost what SD 1.5 costs, tiny must load."""

from __future__ import annotations

import torch

from workers.builtin_models import BUILT_MODELS, build_sd15_sized_pipeline, resolve_model

# Parameter counts of SD 1.5's published components (runwayml/stable-diffusion-v1-5).
SD15_UNET_PARAMETERS = 859_520_964
SD15_VAE_PARAMETERS = 83_653_863
CLIP_VIT_L14_TEXT_PARAMETERS = 123_060_480   # with its 49,408-token vocabulary


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sd15_random_has_sd15s_components():
    with torch.device("meta"):                 # shapes only: no 4 GB of random weights
        pipe = build_sd15_sized_pipeline()
    assert parameters(pipe.unet) == SD15_UNET_PARAMETERS
    assert parameters(pipe.vae) == SD15_VAE_PARAMETERS
    # Only the token table is smaller (the byte-level vocabulary); every layer is the same.
    vocabulary_gap = (49_408 - len(pipe.tokenizer)) * pipe.text_encoder.config.hidden_size
    assert parameters(pipe.text_encoder) == CLIP_VIT_L14_TEXT_PARAMETERS - vocabulary_gap
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 768
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size == 64   # 512 px


def test_tiny_is_built_once_and_reused(tmp_path):
    source, label = resolve_model("tiny", tmp_path)
    index = tmp_path / BUILT_MODELS["tiny"].directory / "model_index.json"
    written = index.stat().st_mtime_ns
    assert resolve_model("tiny", tmp_path) == (source, label)
    assert index.stat().st_mtime_ns == written
    assert "TEST model" in label
    assert [p.name for p in tmp_path.iterdir()] == [index.parent.name]  # no staging left


def test_auto_picks_the_embedder_and_table_profiled_for_the_model(tmp_path, monkeypatch) -> None:
    from workers import builtin_models

    assert builtin_models.cache_embedder("auto", "scene") == builtin_models.SCENE_EMBEDDER
    assert builtin_models.cache_embedder("auto", "tiny") == "minilm"
    assert builtin_models.cache_embedder("minilm", "scene") == "minilm"  # a set value wins

    monkeypatch.setattr(builtin_models, "SCENE_K_TABLES", tmp_path)
    (tmp_path / "k-table-scene-clip.json").write_text("{}")
    assert builtin_models.cache_k_table("auto", "scene", "clip") == str(
        tmp_path / "k-table-scene-clip.json")
    assert builtin_models.cache_k_table("auto", "scene", "minilm") == "reference"  # none profiled
    assert builtin_models.cache_k_table("auto", "/models/mine", "clip") == "reference"
    assert builtin_models.cache_k_table("/t.json", "scene", "clip") == "/t.json"


def test_auto_serves_the_step_cache_the_models_table_names() -> None:
    from cachemgr.ktable import REFERENCE_TABLE, KTable
    from workers.builtin_models import cache_k_table, cache_step_cache

    for embedder in ("clip", "minilm"):
        scene = KTable.load(cache_k_table("auto", "scene", embedder))
        assert cache_step_cache("auto", scene).spec == "deepcache:3:0.2"
        assert cache_step_cache("off", scene).spec == "off"   # a set value wins
    assert cache_step_cache("auto", REFERENCE_TABLE).spec == "off"
    assert cache_step_cache("deepcache:4", REFERENCE_TABLE).spec == "deepcache:4"

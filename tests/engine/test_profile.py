"""The profiling command end to end on the tiny model with the real MiniLM embedder and a
briefly trained evaluator (a test of the code path, not of the numbers), and the scorers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cachemgr.ktable import KTable
from core.errors import ModelLoadError
from quality import evaluator, profile
from quality.scenes import caption, render, sample_scene
from quality.scoring import load_scorer
from quality.world_model import world_tokenizer


@pytest.fixture(scope="module")
def evaluator_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("evaluator") / "evaluator.pt"
    evaluator.save(evaluator.train(scenes=128, epochs=1, seed=0, progress=False), path)
    return path


def test_profile_reports_bins_a_heatmap_and_a_table_triage_loads(tmp_path, monkeypatch,
                                                                 evaluator_weights) -> None:
    monkeypatch.setenv("T2I_STATE_DIR", str(tmp_path / "state"))  # the tiny model is built here
    out, table_path = tmp_path / "profile", tmp_path / "table.json"
    common = ["--model", "tiny", "--scorer", f"scene:{evaluator_weights}", "--pairs-per-bin",
              "1", "--steps", "5", "--out", str(out)]
    assert profile.main([*common, "--candidates", "80", "--ks", "1,3", "--tolerance", "0",
                         "--table-out", str(table_path)]) == 0

    report = json.loads(out.with_suffix(".json").read_text())
    assert len(report["bins"]) >= 3  # the candidates spread over the similarity range
    for row in report["bins"]:
        assert row["pairs"] == 1 and set(row["ratio"]) == {"1", "3"}
        assert row["similarity_low"] <= row["mean_similarity"] <= row["similarity_high"]
        assert 0 <= row["scratch_score"] <= 1
    assert out.with_suffix(".png").stat().st_size > 0
    table = KTable.load(str(table_path))
    lowest = min(row["similarity_low"] for row in report["bins"])
    assert table.reference_steps == 5 and table.thresholds == ((lowest, 3),)
    assert report["table"]["name"] == table.name

    # No K can keep 150% of the from-scratch score: the report stays, no table is written.
    refused = tmp_path / "refused.json"
    assert profile.main([*common, "--candidates", "5", "--ks", "2", "--tolerance", "1.5",
                         "--table-out", str(refused)]) == 1
    assert json.loads(out.with_suffix(".json").read_text())["table"] is None
    assert not refused.exists()


def test_scene_scorer_gives_true_renders_full_adherence(evaluator_weights) -> None:
    import random

    rng = random.Random(2)
    scenes = [sample_scene(rng) for _ in range(4)]
    scorer = load_scorer(f"scene:{evaluator_weights}")
    scores = scorer.score([caption(s, rng) for s in scenes], np.stack([render(s) for s in scenes]))
    assert scores.shape == (4,) and ((0 <= scores) & (scores <= 1)).all()
    with pytest.raises(ValueError, match="not a scene caption"):
        scorer.score(["a photo of a cat"], np.stack([render(scenes[0])]))


def test_clip_scorer_loads_a_local_clip_model(tmp_path) -> None:
    """A randomly initialised CLIP stands in for real weights (none can be downloaded here):
    the scorer's loading and arithmetic, not its judgement."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = world_tokenizer()
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 40},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                     crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(tmp_path / "clip")
    scorer = load_scorer(f"clip:{tmp_path / 'clip'}")
    images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    scores = scorer.score(["a big red circle on the left, blue background", "red"], images)
    assert scorer.name == "clipscore-clip"
    assert scores.shape == (2,) and ((0 <= scores) & (scores <= 100)).all()

    with pytest.raises(ModelLoadError, match="cannot load CLIP model"):
        load_scorer(f"clip:{tmp_path / 'missing'}")
    with pytest.raises(ModelLoadError, match="'nope' unknown"):
        load_scorer("nope")

"""The profiling command end to end on the tiny model with the real MiniLM embedder and a
briefly trained evaluator (a test of the code path, not of the numbers), and the scorers."""

from __future__ import annotations

import json
import re
from collections import Counter

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


def test_profile_compares_embedders_on_the_same_pairs_with_intervals(
        tmp_path, monkeypatch, evaluator_weights) -> None:
    monkeypatch.setenv("T2I_STATE_DIR", str(tmp_path / "state"))  # the tiny model is built here
    out = tmp_path / "profile"
    common = ["--model", "tiny", "--scorer", f"scene:{evaluator_weights}", "--steps", "5",
              "--embedders", "minilm,clip", "--bootstrap", "200", "--out", str(out)]
    assert profile.main([*common, "--candidates", "60", "--pairs-per-bin", "2", "--ks", "1,3",
                         "--tolerance", "0"]) == 0

    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["embedders"]) == {"minilm", "clip"}
    assert set(report["pair_kinds"]) <= set(profile.SCENE_KINDS)
    assert report["pairs_measured"] == sum(report["pair_kinds"].values())
    for spec, result in report["embedders"].items():
        assert len(result["bins"]) >= 2  # the candidates spread over the similarity range
        # Every measured pair falls in at most one bin of each embedder, and each embedder
        # got up to 2 per bin (more where the other embedder's bins needed that pair).
        assert sum(row["pairs"] for row in result["bins"]) <= report["pairs_measured"]
        for row in result["bins"]:
            assert row["pairs"] == sum(row["kinds"].values()) >= 1
            assert row["similarity_low"] <= row["mean_similarity"] <= row["similarity_high"]
            assert 0 <= row["scratch_score"] <= 1 and set(row["ratio"]) == {"1", "3"}
            for cell in row["ratio"].values():
                if cell["value"] is not None:
                    low, high = cell["ci95"]
                    assert low <= cell["value"] <= high
        assert set(result["auc_safe_vs_similarity"]) == {"1", "3"}
        assert (tmp_path / f"profile-{spec}.png").stat().st_size > 0
        table = KTable.load(str(tmp_path / f"profile-table-{spec}.json"))
        lowest = min(row["similarity_low"] for row in result["bins"])
        assert table.reference_steps == 5 and table.thresholds == ((lowest, 3),)
        assert result["table"]["name"] == table.name

    # No K can keep 150% of the from-scratch score: the report stays, no table is written.
    for path in tmp_path.glob("profile-table-*.json"):
        path.unlink()
    assert profile.main([*common, "--candidates", "5", "--pairs-per-bin", "1", "--ks", "2",
                         "--tolerance", "1.5"]) == 1
    assert all(result["table"] is None for result in
               json.loads(out.with_suffix(".json").read_text())["embedders"].values())
    assert not list(tmp_path.glob("profile-table-*.json"))


def test_selection_fills_every_embedders_bins_from_one_set_of_pairs() -> None:
    similarities = {"a": np.array([0.55, 0.56, 0.95, 0.97, 0.3]),
                    "b": np.array([0.95, 0.96, 0.55, 0.96, 0.3])}
    kept = profile.select(similarities, (0.5, 0.9), per_bin=1)
    # 0: a's low bin and b's high bin; 1: adds nothing; 2: a's high, b's low; 3, 4: nothing.
    assert kept == [0, 2]


def test_the_lower_end_of_an_interval_decides_the_table() -> None:
    bins = [{"similarity_low": 0.9, "ratio": {4: {"value": 0.99, "ci95": [0.96, 1.0]},
                                            8: {"value": 0.97, "ci95": [0.90, 1.0]}}},
            {"similarity_low": 0.8, "ratio": {4: {"value": 0.96, "ci95": [0.80, 1.0]},
                                            8: {"value": None, "ci95": None}}}]
    assert profile.lower_bounds(bins) == {0.9: {4: 0.96, 8: 0.90}, 0.8: {4: 0.80, 8: 0.0}}


def test_auc_is_the_chance_a_positive_outranks_a_negative() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    assert profile.auc(scores, np.array([True, True, False, False])) == 1.0
    assert profile.auc(scores, np.array([False, False, True, True])) == 0.0
    assert profile.auc(np.array([0.5, 0.5]), np.array([True, False])) == 0.5
    assert profile.auc(scores, np.ones(4, dtype=bool)) is None


def test_scene_pairs_come_in_the_kinds_traffic_has() -> None:
    import random

    from quality.scenes import parse_caption

    pairs = profile.scene_pairs(random.Random(3), 50)
    assert Counter(pair.kind for pair in pairs) == {kind: 10 for kind in profile.SCENE_KINDS}
    for pair in pairs:
        first, second = parse_caption(pair.first), parse_caption(pair.second)
        assert (pair.second_seed != pair.seed) == (pair.kind == "re-roll")
        if pair.kind in ("re-roll", "paraphrase"):
            assert first == second
        if pair.kind == "one-word edit":
            assert len(first.attributes() ^ second.attributes()) == 2
        if pair.kind == "added or removed object":
            assert {len(first.objects), len(second.objects)} == {1, 2}
            longer, shorter = sorted((pair.first, pair.second), key=len, reverse=True)
            assert set(re.findall(r"\w+", shorter)) < set(re.findall(r"\w+", longer))


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

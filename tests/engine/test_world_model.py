"""The scene-world model's training code path: a few steps of each stage, a checkpoint
resume, and the result loaded by the serving engine like any diffusers model (a test of the
code, not of image quality)."""

from __future__ import annotations

import io

import torch
from PIL import Image

from core.jobs import JobRequest
from quality import assess, evaluator
from quality.world_model import train, world_tokenizer
from workers.engine import Engine


def test_world_words_are_whole_tokens() -> None:
    tokens = world_tokenizer().tokenize("blue backdrop: a huge red disc at left")
    assert tokens == ["blue</w>", "backdrop</w>", ":</w>", "a</w>", "huge</w>", "red</w>",
                      "disc</w>", "at</w>", "left</w>"]


def test_a_few_training_steps_give_a_model_the_engine_serves(tmp_path) -> None:
    out = tmp_path / "scene-sd"
    train(out, autoencoder_steps=2, denoiser_steps=1, seed=0, progress=False)
    first = torch.load(out / "stage2.pt", weights_only=True)
    assert first["step"] == 1
    model_dir = train(out, autoencoder_steps=2, denoiser_steps=2, seed=0, progress=False)
    assert torch.load(out / "stage2.pt", weights_only=True)["step"] == 2  # resumed, not restarted
    engine = Engine.load(str(model_dir), "ddim", "cpu", tmp_path / "models", True)
    request = JobRequest("a big red circle on the left, blue background", "", 10, 7.5, 1, 64, 64)
    assert engine.latent_shape(request) == (1, 4, 16, 16)
    full = engine.generate(request, lambda step, total: None, frozenset({4}))
    assert Image.open(io.BytesIO(full.image_png)).size == (64, 64)
    resumed = engine.resume(request, full.captured[4], 4, lambda step, total: None)
    assert resumed.unet_calls == full.unet_calls * 6 // 10

    judge = evaluator.train(scenes=128, epochs=1, seed=0, progress=False)
    report, pairs = assess.assess(engine, judge, count=6, seed=5, steps=3, guidance=4.0,
                                  progress=False)
    assert 0 <= report["adherence_generated"] <= 1 and 0 <= report["adherence_true_scenes"] <= 1
    assert report["fid_evaluator_features"] >= 0
    low, high = report["adherence_generated_ci95"]
    assert low <= report["adherence_generated"] <= high
    assert set(report["attribute_accuracy_generated"]) == {"bg", "colour", "shape", "size"}
    assert len(report["samples"]) == 6 and pairs[0].shape == (64, 128, 3)


def test_the_committed_scene_model_is_served_by_name(tmp_path) -> None:
    engine = Engine.load("scene", "ddim", "cpu", tmp_path / "models", True)
    assert engine.label.startswith("scene-sd")
    request = JobRequest("a big red circle on the left, blue background", "", 4, 4.0, 1, 64, 64)
    image = Image.open(io.BytesIO(engine.generate(request, lambda step, total: None).image_png))
    assert image.size == (64, 64)

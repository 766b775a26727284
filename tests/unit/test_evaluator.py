"""The scene evaluator's code path: a few training steps, reading attributes back, saving and
loading (a test of the code, not of the accuracy, which `python -m quality.evaluator`
measures on held-out scenes)."""

from __future__ import annotations

import random

from quality import evaluator
from quality.scenes import Scene, SceneObject, render


def test_targets_mark_empty_positions_and_skip_their_colour() -> None:
    scene = Scene("blue", (SceneObject("circle", "red", "big", "left"),))
    target = evaluator.targets(scene)
    assert target["left.shape"] == evaluator.SHAPE_CLASSES.index("circle")
    assert target["right.shape"] == 0 and target["right.colour"] == -100
    assert target["bg"] == evaluator.COLOUR_NAMES.index("blue")


def test_a_briefly_trained_evaluator_reads_background_colours(tmp_path) -> None:
    model = evaluator.train(scenes=1024, epochs=5, seed=0, progress=False)
    path = tmp_path / "evaluator.pt"
    evaluator.save(model, path)
    loaded = evaluator.load(path)
    measured = evaluator.accuracy(loaded, count=200, seed=1)
    assert 0.0 <= measured["exact_scene_match"] <= 1.0
    assert measured["attribute_recall"] > 0.3  # well above chance (1/8 per colour) already
    image = evaluator.to_tensor(render(Scene("green", ()), random.Random(0))[None])
    found = loaded.read(image)[0]
    assert any(item.startswith("bg=") for item in found)
    assert loaded.embed(image).shape == (1, 128)

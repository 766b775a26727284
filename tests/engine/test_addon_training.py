"""The add-on training commands, run a few steps on the scene model: the LoRA they write
passes the upload check against the scene model and resumes from its checkpoint; the
ControlNet they write loads. The committed layout ControlNet (that command's output at full
length) places objects where a layout map says, by the placement score."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel

from core.addons import ControlRef, check_lora_file, control_key
from core.jobs import JobRequest
from quality.controlnet import SCENE_CONTROLNET_DIR, layout_map, placement
from quality.controlnet import train as train_controlnet
from quality.evaluator import png_pixels
from quality.lora import STYLES, load_scene_pipeline
from quality.lora import train as train_lora
from quality.placement import png
from quality.scenes import Scene, SceneObject, caption, render, sample_scene
from quality.step_cache import run_together
from workers.controlnet import ControlConfig
from workers.engine import Engine
from workers.lora import lora_targets


@pytest.mark.parametrize("style", sorted(STYLES))
def test_a_trained_lora_passes_the_upload_check_and_resumes(style, tmp_path):
    out = tmp_path / f"{style}.safetensors"
    train_lora(style, out, steps=2, rank=2, seed=0, batch_size=2, progress=False)
    targets = lora_targets(load_scene_pipeline().unet)
    found = check_lora_file(out.read_bytes(), targets, max_bytes=2**20, max_rank=4)
    assert found.rank == 2 and set(found.modules) == set(targets)
    first = out.read_bytes()
    train_lora(style, out, steps=3, rank=2, seed=0, batch_size=2, progress=False)
    assert torch.load(out.with_suffix(".ckpt"), weights_only=True)["step"] == 3
    assert out.read_bytes() != first


def test_a_trained_controlnet_loads_as_a_diffusers_controlnet(tmp_path):
    out = train_controlnet(tmp_path / "layout", steps=2, seed=0, batch_size=2, progress=False)
    loaded = ControlNetModel.from_pretrained(out)
    assert loaded.config.conditioning_embedding_out_channels == [16, 32, 64]
    assert (SCENE_CONTROLNET_DIR / "config.json").is_file()   # the committed one


def test_placement_scores_the_drawn_objects_against_the_layout():
    scene = Scene("blue", (SceneObject("square", "red", "big", "left"),))
    layout = layout_map(scene, 5)
    drawn = render(scene, random.Random(5))
    assert placement(drawn, layout) > 0.9                      # where the map says
    moved = np.roll(drawn, 20, axis=1)
    assert placement(moved, layout) < 0.3
    assert placement(render(Scene("blue", ())), layout) == 0.0



def test_the_committed_layout_controlnet_places_objects_where_the_map_says(tmp_path):
    """12 scene prompts, the scene model with and without its layout ControlNet (the
    profile, quality.placement, measures 200 prompts: 0.43 -> 0.75)."""
    rng = random.Random(99)
    scenes = [sample_scene(rng) for _ in range(12)]
    prompts = [caption(scene, rng) for scene in scenes]
    layouts = [layout_map(scene, index) for index, scene in enumerate(scenes)]
    stored = {control_key(f"{index:064x}"): png(layout) for index, layout in enumerate(layouts)}
    engine = Engine.load("scene", "ddim", "cpu", tmp_path, True, controls=ControlConfig(
        stored.__getitem__, {"layout": str(SCENE_CONTROLNET_DIR)}))
    scores = {}
    for arm in ("without", "with"):
        jobs = [JobRequest(prompt, "", 25, 4.0, 1, 64, 64,
                           controlnet=ControlRef("layout", 1.0, f"{index:064x}")
                           if arm == "with" else None) for index, prompt in enumerate(prompts)]
        done = run_together(engine, [engine.begin(job, lambda *_: None) for job in jobs])
        scores[arm] = np.mean([placement(png_pixels(g.image_png), layout)
                               for g, layout in zip(done, layouts)])
    assert scores["with"] > scores["without"] + 0.15, scores

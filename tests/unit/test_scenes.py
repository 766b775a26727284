"""The procedural scene world: seeded, captions name every attribute, pictures show them."""

from __future__ import annotations

import random

import numpy as np
import pytest

from quality.scenes import (
    COLOURS,
    POSITION_WORDS,
    POSITIONS,
    SHAPE_WORDS,
    SIZE,
    SIZE_WORDS,
    Scene,
    SceneObject,
    adherence,
    caption,
    edit,
    parse_caption,
    render,
    sample_scene,
)


def test_scenes_and_captions_are_seeded() -> None:
    def draw(seed: int) -> tuple[Scene, str]:
        rng = random.Random(seed)
        scene = sample_scene(rng)
        return scene, caption(scene, rng)

    assert draw(7) == draw(7) and draw(7) != draw(8)


def test_captions_vary_but_name_every_attribute() -> None:
    rng = random.Random(3)
    scene = Scene("blue", (SceneObject("circle", "red", "big", "left"),
                           SceneObject("square", "white", "small", "right")))
    captions = {caption(scene, rng) for _ in range(50)}
    assert len(captions) > 20
    for text in captions:
        assert "blue" in text and "red" in text and "white" in text
        assert any(w in text for w in SHAPE_WORDS["circle"])
        assert any(w in text for w in SHAPE_WORDS["square"])
        assert any(w in text for w in SIZE_WORDS["big"]) and any(w in text for w in SIZE_WORDS["small"])
        assert any(w in text for w in POSITION_WORDS["left"])
        assert any(w in text for w in POSITION_WORDS["right"])


def test_objects_never_take_the_background_colour() -> None:
    rng = random.Random(0)
    for _ in range(500):
        scene = sample_scene(rng)
        assert all(item.colour != scene.background for item in scene.objects)
        assert 1 <= len(scene.objects) <= 2


def test_render_draws_each_object_at_its_position() -> None:
    scene = Scene("green", (SceneObject("square", "red", "big", "left"),
                            SceneObject("circle", "yellow", "small", "right")))
    image = render(scene)
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    middle = SIZE // 2
    assert tuple(image[middle, POSITIONS["left"]]) == COLOURS["red"]
    assert tuple(image[middle, POSITIONS["right"]]) == COLOURS["yellow"]
    assert tuple(image[2, 2]) == COLOURS["green"]
    assert tuple(image[middle, POSITIONS["center"]]) == COLOURS["green"]


def test_adherence_is_the_share_of_asked_attributes_found() -> None:
    scene = Scene("blue", (SceneObject("circle", "red", "big", "left"),))
    asked = scene.attributes()
    assert len(asked) == 4 and adherence(asked, asked) == 1.0
    wrong_colour = Scene("blue", (SceneObject("circle", "green", "big", "left"),)).attributes()
    assert adherence(asked, wrong_colour) == 0.75


def test_parse_caption_inverts_caption() -> None:
    rng = random.Random(11)
    for _ in range(2000):
        scene = sample_scene(rng)
        assert parse_caption(caption(scene, rng)) == scene


@pytest.mark.parametrize("text", ["a photo of a cat", "a big red circle on the left",
                                  "blue background", "a big red circle and a box, blue background"])
def test_parse_caption_names_what_is_not_a_scene_caption(text: str) -> None:
    with pytest.raises(ValueError, match="not a scene caption"):
        parse_caption(text)


def test_an_edit_changes_exactly_one_attribute() -> None:
    rng = random.Random(4)
    for _ in range(500):
        scene = sample_scene(rng)
        edited = edit(scene, rng)
        changed = scene.attributes() ^ edited.attributes()
        assert len(changed) == 2  # one value out, one in
        assert all(item.colour != edited.background for item in edited.objects)

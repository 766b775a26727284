"""A procedural text-to-image world where prompt adherence is measurable (issue: quality
harness). Pure: numpy and Pillow only, seeded.

A scene is a coloured background with one or two objects (shape, colour, size) at named
positions. ``render`` draws it at 64x64; ``caption`` describes it in varied words (templates,
synonyms, word order), so similar scenes get similar but not identical prompts, as real
users' edits do; ``attributes`` is the ground truth an evaluator reads back.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 75, 215),
    "yellow": (235, 210, 45), "purple": (135, 60, 175), "orange": (240, 135, 30),
    "white": (240, 240, 240), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 7, "big": 13}             # half-width in pixels
POSITIONS = {"left": 16, "center": 32, "right": 48}  # x of the object's centre

SHAPE_WORDS = {"circle": ["circle", "disc", "round dot", "ball"],
               "square": ["square", "box", "block", "tile"],
               "triangle": ["triangle", "wedge", "pyramid shape"]}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "big": ["big", "large", "huge"]}
POSITION_WORDS = {"left": ["on the left", "at left", "to the left"],
                  "center": ["in the middle", "at the center", "in the centre"],
                  "right": ["on the right", "at right", "to the right"]}
BACKGROUND_TEMPLATES = ["{c} background", "on a {c} backdrop", "against {c}",
                        "{c} backdrop", "with a {c} background"]


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]

    def attributes(self) -> frozenset[str]:
        """The ground truth: ``bg=<colour>`` and ``<position>.<slot>=<value>`` per object."""
        found = {f"bg={self.background}"}
        for item in self.objects:
            found |= {f"{item.position}.shape={item.shape}", f"{item.position}.colour={item.colour}",
                      f"{item.position}.size={item.size}"}
        return frozenset(found)


def sample_scene(rng: random.Random) -> Scene:
    background = rng.choice(list(COLOURS))
    positions = rng.choice([["left"], ["center"], ["right"], ["left", "right"]])
    objects = tuple(SceneObject(rng.choice(SHAPES),
                                rng.choice([c for c in COLOURS if c != background]),
                                rng.choice(list(SIZES)), position) for position in positions)
    return Scene(background, objects)


def render(scene: Scene, jitter: random.Random | None = None) -> np.ndarray:
    """The scene as a SIZE x SIZE x 3 uint8 array; ``jitter`` moves and scales objects a
    little (training data for the evaluator; captions do not change)."""
    image = Image.new("RGB", (SIZE, SIZE), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    for item in scene.objects:
        half = SIZES[item.size] + (jitter.randint(-1, 1) if jitter else 0)
        x = POSITIONS[item.position] + (jitter.randint(-3, 3) if jitter else 0)
        y = SIZE // 2 + (jitter.randint(-8, 8) if jitter else 0)
        box = (x - half, y - half, x + half, y + half)
        fill = COLOURS[item.colour]
        if item.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif item.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x, y - half), (x - half, y + half), (x + half, y + half)], fill=fill)
    return np.asarray(image, dtype=np.uint8)


def _describe(item: SceneObject, rng: random.Random) -> str:
    words = [rng.choice(SIZE_WORDS[item.size]), item.colour, rng.choice(SHAPE_WORDS[item.shape])]
    if rng.random() < 0.3:
        words[0], words[1] = words[1], words[0]  # "red big circle" as well as "big red circle"
    where = rng.choice(POSITION_WORDS[item.position])
    return f"a {' '.join(words)} {where}" if rng.random() < 0.7 else f"{where}, a {' '.join(words)}"


def caption(scene: Scene, rng: random.Random) -> str:
    """One of many phrasings of ``scene``: every attribute is named, the words vary."""
    parts = [_describe(item, rng) for item in scene.objects]
    rng.shuffle(parts)
    background = rng.choice(BACKGROUND_TEMPLATES).format(c=scene.background)
    joined = " and ".join(parts)
    return f"{background}: {joined}" if rng.random() < 0.3 else f"{joined}, {background}"


def adherence(asked: frozenset[str], found: frozenset[str]) -> float:
    """The fraction of the prompt's attributes found in the image."""
    return len(asked & found) / len(asked)

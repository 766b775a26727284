"""A procedural text-to-image world where prompt adherence is measurable (issue: quality
harness). Pure: numpy and Pillow only, seeded.

A scene is a coloured background with one or two objects (shape, colour, size) at named
positions. ``render`` draws it at 64x64; ``caption`` describes it in varied words (templates,
synonyms, word order), so similar scenes get similar but not identical prompts, as real
users' edits do; ``attributes`` is the ground truth an evaluator reads back.
"""

from __future__ import annotations

import random
import re
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


def caption(scene: Scene, rng: random.Random, omit: int | None = None) -> str:
    """One of many phrasings of ``scene``: every attribute is named, the words vary.
    ``omit`` leaves out the object at that index and phrases the rest exactly as with it
    (a user deleting an object from a prompt)."""
    parts = [_describe(item, rng) for item in scene.objects]
    order = list(range(len(parts)))
    rng.shuffle(order)
    background = rng.choice(BACKGROUND_TEMPLATES).format(c=scene.background)
    joined = " and ".join(parts[index] for index in order if index != omit)
    return f"{background}: {joined}" if rng.random() < 0.3 else f"{joined}, {background}"


def adherence(asked: frozenset[str], found: frozenset[str]) -> float:
    """The fraction of the prompt's attributes found in the image."""
    return len(asked & found) / len(asked)


def _find(text: str, words_by_value: dict[str, list[str]]) -> list[str]:
    """Values whose phrase occurs in ``text`` as whole words."""
    return [value for value, words in words_by_value.items()
            if any(re.search(rf"\b{re.escape(word)}\b", text) for word in words)]


def parse_caption(text: str) -> Scene:
    """The scene a caption describes (the inverse of ``caption``), so a scorer needs only the
    prompt. Raises ValueError naming the text when it is not a scene-world caption."""
    background = re.search(r"\bagainst (\w+)\b|\b(\w+) (?:background|backdrop)\b", text)
    if not background or (colour := background.group(1) or background.group(2)) not in COLOURS:
        raise ValueError(f"not a scene caption (no background colour): {text!r}")
    rest = text[:background.start()] + text[background.end():]
    objects = []
    for part in re.split(r"\band\b", rest):
        if not part.strip(" ,:"):
            continue
        found = (_find(part, SHAPE_WORDS), [c for c in COLOURS if re.search(rf"\b{c}\b", part)],
                 _find(part, SIZE_WORDS), _find(part, POSITION_WORDS))
        if any(len(values) != 1 for values in found):
            raise ValueError(f"not a scene caption (object {part.strip()!r}): {text!r}")
        objects.append(SceneObject(*(values[0] for values in found)))
    if not objects:
        raise ValueError(f"not a scene caption (no object): {text!r}")
    return Scene(colour, tuple(sorted(objects, key=lambda o: POSITIONS[o.position])))


def edit(scene: Scene, rng: random.Random) -> Scene:
    """One small user edit: another background, or one object's shape, colour or size."""
    choice = rng.randrange(1 + 3 * len(scene.objects))
    if choice == 0:
        taken = {item.colour for item in scene.objects}
        return Scene(rng.choice([c for c in COLOURS if c not in taken | {scene.background}]),
                     scene.objects)
    index, field = divmod(choice - 1, 3)
    item = scene.objects[index]
    if field == 0:
        item = SceneObject(rng.choice([s for s in SHAPES if s != item.shape]), item.colour,
                           item.size, item.position)
    elif field == 1:
        item = SceneObject(item.shape, rng.choice([c for c in COLOURS if c not in
                                                   (item.colour, scene.background)]),
                           item.size, item.position)
    else:
        item = SceneObject(item.shape, item.colour,
                           next(s for s in SIZES if s != item.size), item.position)
    return Scene(scene.background, scene.objects[:index] + (item,) + scene.objects[index + 1:])


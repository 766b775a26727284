"""The evaluator: a small CNN trained on the scene world's ground truth that reads the
attributes back from an image, so prompt adherence can be measured on generated images.

    python -m quality.evaluator --scenes 20000 --out ~/.cache/t2i/quality/evaluator.pt

It reads the background colour and, at each position, whether an object is there and its
shape, colour and size. Training images are jittered, blurred and noised, because generated
images are not crisp; its accuracy on held-out scenes is reported (the metric means nothing
if that is low).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import nn
from tqdm import tqdm

from quality.scenes import COLOURS, POSITIONS, SHAPES, SIZES, Scene, render, sample_scene

DEFAULT_EVALUATOR = Path.home() / ".cache/t2i/quality/evaluator.pt"  # where main() writes
COLOUR_NAMES = list(COLOURS)
SHAPE_CLASSES = ["none", *SHAPES]   # "none": no object at that position
SIZE_NAMES = list(SIZES)
HEADS = {"bg": len(COLOUR_NAMES),
         **{f"{p}.{slot}": n for p in POSITIONS for slot, n in
            (("shape", len(SHAPE_CLASSES)), ("colour", len(COLOUR_NAMES)),
             ("size", len(SIZE_NAMES)))}}


def add_scoring_options(parser: argparse.ArgumentParser, size: bool = True) -> None:
    """The options of every command that generates scene images and scores them with the
    evaluator: weights, sampling, image side (unless the command fixes it), resamples."""
    parser.add_argument("--evaluator", default=str(DEFAULT_EVALUATOR),
                        help="weights from python -m quality.evaluator")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    if size:
        parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")



def targets(scene: Scene) -> dict[str, int]:
    """Class index per head; colour and size of an empty position are not scored (-100)."""
    out = {"bg": COLOUR_NAMES.index(scene.background)}
    for position in POSITIONS:
        out.update({f"{position}.shape": 0, f"{position}.colour": -100, f"{position}.size": -100})
    for item in scene.objects:
        out[f"{item.position}.shape"] = SHAPE_CLASSES.index(item.shape)
        out[f"{item.position}.colour"] = COLOUR_NAMES.index(item.colour)
        out[f"{item.position}.size"] = SIZE_NAMES.index(item.size)
    return out


def degraded(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """Blur and noise like a small diffusion model's output."""
    blurred = Image.fromarray(image).filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.5)))
    noisy = np.asarray(blurred, dtype=np.float32) + np.random.default_rng(
        rng.getrandbits(32)).normal(0, rng.uniform(0, 12), image.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def png_pixels(png: bytes) -> np.ndarray:
    """A PNG (as the engine and the object store hold images) -> H x W x 3 uint8 RGB."""
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """N x H x W x 3 uint8 -> N x 3 x H x W floats in [-1, 1] (the pipelines' range)."""
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class Evaluator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        def block(inputs: int, outputs: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs),
                                 nn.ReLU(), nn.MaxPool2d(2))
        self.features = nn.Sequential(block(3, 16), block(16, 32), block(32, 64), block(64, 128),
                                      nn.Flatten())  # 128 x 4 x 4
        self.heads = nn.ModuleDict({name.replace(".", "_"): nn.Linear(128 * 16, n)
                                    for name, n in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(images)
        return {name: self.heads[name.replace(".", "_")](features) for name in HEADS}

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """128 features per image (the last block, averaged over its 4x4 positions) for an
        FID-style distance between sets of images."""
        self.eval()
        return self.features(images).view(images.shape[0], 128, 16).mean(2)

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> list[frozenset[str]]:
        """The attributes seen in each image, in ``Scene.attributes`` form."""
        self.eval()
        logits = {name: out.argmax(1).tolist() for name, out in self(images).items()}
        found = []
        for index in range(images.shape[0]):
            seen = {f"bg={COLOUR_NAMES[logits['bg'][index]]}"}
            for position in POSITIONS:
                shape = SHAPE_CLASSES[logits[f"{position}.shape"][index]]
                if shape != "none":
                    seen |= {f"{position}.shape={shape}",
                             f"{position}.colour={COLOUR_NAMES[logits[f'{position}.colour'][index]]}",
                             f"{position}.size={SIZE_NAMES[logits[f'{position}.size'][index]]}"}
            found.append(frozenset(seen))
        return found


def dataset(count: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[Scene]]:
    rng = random.Random(seed)
    scenes = [sample_scene(rng) for _ in range(count)]
    images = np.stack([degraded(render(scene, jitter=rng), rng) for scene in scenes])
    labels = [targets(scene) for scene in scenes]
    return (to_tensor(images), {name: torch.tensor([t[name] for t in labels]) for name in HEADS},
            scenes)


def train(scenes: int, epochs: int, seed: int, progress: bool = True) -> Evaluator:
    torch.manual_seed(seed)
    images, labels, _ = dataset(scenes, seed)
    model = Evaluator()
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    batches = range(0, scenes, 128)
    for _ in tqdm(range(epochs), desc="training the evaluator", unit="epoch", disable=not progress):
        model.train()
        order = torch.randperm(scenes)
        for start in batches:
            picked = order[start:start + 128]
            outputs = model(images[picked])
            loss = sum(loss_fn(outputs[name], labels[name][picked]) for name in HEADS)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model


def accuracy(model: Evaluator, count: int, seed: int) -> dict[str, float]:
    """On held-out scenes: exact attribute-set matches, and mean adherence of the truth."""
    images, _, scenes = dataset(count, seed)
    read = model.read(images)
    exact = sum(found == scene.attributes() for found, scene in zip(read, scenes)) / count
    recall = float(np.mean([len(found & scene.attributes()) / len(scene.attributes())
                            for found, scene in zip(read, scenes)]))
    return {"exact_scene_match": exact, "attribute_recall": recall}


def save(model: Evaluator, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)


def load(path: Path) -> Evaluator:
    model = Evaluator()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=20000, help="training scenes")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--held-out", type=int, default=2000, help="scenes to measure it on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DEFAULT_EVALUATOR),
                        help="where the weights go")
    parser.add_argument("--report", default="", help="also write the accuracy as JSON here")
    args = parser.parse_args(argv)
    started = time.monotonic()
    model = train(args.scenes, args.epochs, args.seed)
    measured = accuracy(model, args.held_out, args.seed + 1)
    save(model, Path(args.out).expanduser())
    result = {"command": "python -m quality.evaluator " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "train_scenes": args.scenes, "epochs": args.epochs, "held_out": args.held_out,
              "seconds": round(time.monotonic() - started, 1), **measured}
    if args.report:
        Path(args.report).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

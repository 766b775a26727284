"""Image scorers: how well each image matches its prompt, higher is better.

The profiling and replay commands take any scorer, so operators profile their real model
with CLIPScore while this project measures its scene world with the evaluator:

- ``scene`` (or ``scene:WEIGHTS``): prompt adherence read by the scene-world evaluator
  (default weights: those ``python -m quality.evaluator`` writes); the prompt's attributes
  come from ``parse_caption``, so only scene-world prompts can be scored;
- ``clip:PATH``: CLIPScore, 100 x max(cosine(image, text), 0), with a local CLIP model
  directory (transformers ``CLIPModel`` + its processor).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from core.errors import ModelLoadError
from quality import evaluator as evaluation
from quality.evaluator import DEFAULT_EVALUATOR
from quality.scenes import adherence, parse_caption


class Scorer(Protocol):
    name: str

    def score(self, prompts: list[str], images: np.ndarray) -> np.ndarray:
        """One score per (prompt, N x H x W x 3 uint8 image)."""


class SceneAdherence:
    name = "scene-adherence"

    def __init__(self, weights: Path = DEFAULT_EVALUATOR) -> None:
        if not weights.exists():
            raise ModelLoadError(f"no evaluator weights at {weights}: run python -m quality.evaluator")
        self.judge = evaluation.load(weights)

    def score(self, prompts: list[str], images: np.ndarray) -> np.ndarray:
        asked = [parse_caption(prompt).attributes() for prompt in prompts]
        found = self.judge.read(evaluation.to_tensor(images))
        return np.array([adherence(a, f) for a, f in zip(asked, found)])


class ClipScore:
    def __init__(self, model_dir: str) -> None:
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(model_dir, local_files_only=True).eval()
            self.processor = CLIPProcessor.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load CLIP model {model_dir!r}: {exc}") from exc
        self.name = f"clipscore-{Path(model_dir).name}"

    @torch.inference_mode()
    def score(self, prompts: list[str], images: np.ndarray) -> np.ndarray:
        inputs = self.processor(text=prompts, images=list(images), return_tensors="pt",
                                padding=True, truncation=True)
        out = self.model(**inputs)
        text = torch.nn.functional.normalize(out.text_embeds, dim=-1)
        image = torch.nn.functional.normalize(out.image_embeds, dim=-1)
        return (100 * (text * image).sum(-1).clamp(min=0)).numpy()


def load_scorer(spec: str) -> Scorer:
    """'scene', 'scene:WEIGHTS' or 'clip:PATH'."""
    kind, _, path = spec.partition(":")
    if kind == "scene":
        return SceneAdherence(Path(path).expanduser() if path else DEFAULT_EVALUATOR)
    if kind == "clip" and path:
        return ClipScore(str(Path(path).expanduser()))
    raise ModelLoadError(f"scorer {spec!r} unknown (use 'scene', 'scene:WEIGHTS' or 'clip:PATH')")

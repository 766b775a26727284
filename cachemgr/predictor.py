"""The match predictor: may skip the vector lookup for prompts that will surely miss. Pure.

A one-class SVM (RBF kernel) is trained on the embeddings of prompts whose lookup found a
usable match. A prompt inside that support is looked up; one outside is predicted to miss
and goes straight to full generation. Until enough samples exist the predictor answers
"look up". The trained model is kept as plain arrays (support vectors, dual coefficients,
intercept, gamma) in an .npz, so loading it never unpickles anything.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from sklearn.svm import OneClassSVM


class MatchPredictor(Protocol):
    @property
    def version(self) -> str: ...

    def should_look_up(self, embedding: np.ndarray) -> bool: ...


class AlwaysLookUp:
    """The untrained predictor (and the one used when the predictor is switched off)."""

    version = "untrained"

    def should_look_up(self, embedding: np.ndarray) -> bool:
        return True


@dataclass(frozen=True)
class SvmPredictor:
    support_vectors: np.ndarray
    dual_coef: np.ndarray
    intercept: float
    gamma: float
    version: str
    samples: int

    def decision(self, embeddings: np.ndarray) -> np.ndarray:
        """The SVM's decision function: >= 0 inside the support (a likely match)."""
        x = np.atleast_2d(embeddings).astype(np.float64)
        distances = ((x[:, None, :] - self.support_vectors[None, :, :]) ** 2).sum(-1)
        return np.exp(-self.gamma * distances) @ self.dual_coef + self.intercept

    def should_look_up(self, embedding: np.ndarray) -> bool:
        return bool(self.decision(embedding)[0] >= 0.0)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, support_vectors=self.support_vectors, dual_coef=self.dual_coef,
                 intercept=self.intercept, gamma=self.gamma, version=self.version,
                 samples=self.samples)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> SvmPredictor:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return cls(support_vectors=arrays["support_vectors"], dual_coef=arrays["dual_coef"],
                       intercept=float(arrays["intercept"]), gamma=float(arrays["gamma"]),
                       version=str(arrays["version"]), samples=int(arrays["samples"]))


def median_heuristic_gamma(x: np.ndarray, max_points: int = 1000) -> float:
    """RBF width from the median squared distance between training points (the usual
    median heuristic), on a fixed subsample so it stays cheap and deterministic."""
    sample = x[np.linspace(0, len(x) - 1, min(len(x), max_points)).astype(int)]
    squared = ((sample[:, None, :] - sample[None, :, :]) ** 2).sum(-1)
    median = float(np.median(squared[np.triu_indices(len(sample), k=1)]))
    return 1.0 / median if median > 0 else 1.0


def train_predictor(embeddings: np.ndarray, version: str, nu: float = 0.1,
                    min_samples: int = 200) -> SvmPredictor | None:
    """Fit on the embeddings of prompts that found a usable match; None if too few.

    ``nu`` bounds the fraction of training prompts left outside the support: the share of
    would-be hits the predictor may turn away.
    """
    if len(embeddings) < min_samples:
        return None
    x = np.asarray(embeddings, dtype=np.float64)
    gamma = median_heuristic_gamma(x)
    svm = OneClassSVM(kernel="rbf", nu=nu, gamma=gamma).fit(x)
    return SvmPredictor(support_vectors=svm.support_vectors_, dual_coef=svm.dual_coef_[0],
                        intercept=float(svm.intercept_[0]), gamma=gamma, version=version,
                        samples=len(x))


@dataclass
class PredictorVerdict:
    look_up: bool        # do the vector lookup
    predicted_hit: bool  # what the predictor said
    audited: bool        # a predicted miss looked up anyway, to measure the predictor


def consult(predictor: MatchPredictor, embedding: np.ndarray, audit_fraction: float,
            draw: Callable[[], float]) -> PredictorVerdict:
    """Ask the predictor; sample ``audit_fraction`` of its predicted misses for a lookup
    anyway (``draw`` returns a uniform number in [0, 1), injected for testing)."""
    predicted_hit = predictor.should_look_up(embedding)
    audited = not predicted_hit and draw() < audit_fraction
    return PredictorVerdict(look_up=predicted_hit or audited, predicted_hit=predicted_hit,
                            audited=audited)

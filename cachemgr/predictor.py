"""The match predictor: may skip the vector lookup for prompts that will surely miss. Pure.

The trained one-class SVM comes with the cache-manager work; until a model is trained the
predictor answers "look up" for every prompt, so nothing is skipped.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class MatchPredictor(Protocol):
    def should_look_up(self, embedding: np.ndarray) -> bool: ...


class AlwaysLookUp:
    """The untrained predictor."""

    def should_look_up(self, embedding: np.ndarray) -> bool:
        return True

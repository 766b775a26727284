"""One backoff rule for every retry in the project: doubling from a first delay, capped."""

from __future__ import annotations


def backoff_s(attempt: int, first_s: float, cap_s: float) -> float:
    """Seconds to wait before retry number ``attempt`` (0 for the first)."""
    return min(first_s * 2 ** attempt, cap_s)

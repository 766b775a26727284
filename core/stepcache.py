"""The within-request step cache (DeepCache's, with a warm-up). Pure.

Adjacent denoising steps change the UNet's deep features little, so a step may reuse the
deep features of the last whole step and run only the outermost blocks (the first down block
and the last up block, at full resolution). Early steps, where the picture's layout forms,
change them most: every step in the first ``warmup`` fraction of the N-step grid runs the
whole UNet (a resume from K past it skips that part anyway), then every ``interval``-th
step, counted from the end of the warm-up or from the run's first step if it starts later
(a run's first step is always whole: it has no features yet). One rule for the engine, the
profiles and the replay's compute figures.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.errors import SettingError

OFF = "off"
_SPEC = re.compile(r"deepcache:(\d+)(?::(0|0?\.\d+))?")


@dataclass(frozen=True)
class StepCache:
    """``interval`` 1 is off: every step runs the whole UNet."""

    interval: int = 1
    warmup: float = 0.0

    def __post_init__(self) -> None:
        if self.interval < 1 or not 0.0 <= self.warmup < 1.0:
            raise SettingError(f"step cache interval {self.interval} is not >= 1 or warm-up "
                               f"{self.warmup} not in [0, 1)")

    @classmethod
    def parse(cls, spec: str) -> StepCache:
        """``off``, ``deepcache:N`` (N >= 2: a whole step, then N - 1 shallow ones) or
        ``deepcache:N:F`` (the same after the first fraction F of the grid, all whole)."""
        if spec == OFF:
            return cls()
        match = _SPEC.fullmatch(spec)
        if not match or int(match.group(1)) < 2:
            raise SettingError(f"step cache {spec!r} is neither 'off' nor 'deepcache:N' or "
                               "'deepcache:N:F' with N >= 2 and 0 <= F < 1")
        return cls(int(match.group(1)), float(match.group(2) or 0.0))

    @property
    def on(self) -> bool:
        return self.interval > 1

    @property
    def spec(self) -> str:
        """What the partition and the catalog record: latents made with a step cache are
        not the ones a run without it makes."""
        if not self.on:
            return OFF
        return f"deepcache:{self.interval}" + (f":{self.warmup:g}" if self.warmup else "")

    def warm_steps(self, steps: int) -> int:
        return round(self.warmup * steps)

    def full(self, step: int, start: int, steps: int) -> bool:
        """Whether step ``step`` (0-based, of the ``steps``-step grid) of a run that began
        at step ``start`` runs the whole UNet."""
        anchor = max(start, self.warm_steps(steps))
        return step < anchor or (step - anchor) % self.interval == 0

    def full_steps(self, start: int, steps: int) -> int:
        """How many steps of a run from ``start`` to ``steps`` run the whole UNet."""
        return sum(self.full(step, start, steps) for step in range(start, steps))

    def unet_cost(self, start: int, steps: int, shallow_cost: float) -> float:
        """A run's UNet compute in whole-UNet steps, a shallow step costing ``shallow_cost``
        of a whole one (measured: bench.step_cost)."""
        full = self.full_steps(start, steps)
        return full + (steps - start - full) * shallow_cost


NO_STEP_CACHE = StepCache()

"""The within-request step cache (DeepCache's uniform schedule). Pure.

Adjacent denoising steps change the UNet's deep features little, so a step may reuse the
deep features of the last full step and run only the outermost blocks (the first down block
and the last up block, at full resolution). Every ``interval``-th step of a run (counted from
the run's first step, so a resume from K starts with a full one) runs the whole UNet and
refreshes them. One rule for the engine, the profiles and the replay's compute figures.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.errors import SettingError

OFF = "off"
_SPEC = re.compile(r"deepcache:(\d+)")


@dataclass(frozen=True)
class StepCache:
    """``interval`` 1 is off: every step runs the whole UNet."""

    interval: int = 1

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise SettingError(f"step cache interval {self.interval} is not >= 1")

    @classmethod
    def parse(cls, spec: str) -> StepCache:
        """``off`` or ``deepcache:N`` (N >= 2: a full step, then N - 1 shallow ones)."""
        if spec == OFF:
            return cls()
        match = _SPEC.fullmatch(spec)
        if not match or int(match.group(1)) < 2:
            raise SettingError(f"step cache {spec!r} is neither 'off' nor 'deepcache:N' "
                               "with N >= 2")
        return cls(int(match.group(1)))

    @property
    def on(self) -> bool:
        return self.interval > 1

    @property
    def spec(self) -> str:
        """What the partition and the catalog record: latents made with a step cache are
        not the ones a run without it makes."""
        return f"deepcache:{self.interval}" if self.on else OFF

    def full(self, done: int) -> bool:
        """Whether a run's step after ``done`` of its steps runs the whole UNet."""
        return done % self.interval == 0

    def full_steps(self, run_steps: int) -> int:
        """How many of a run's ``run_steps`` steps run the whole UNet."""
        return sum(self.full(done) for done in range(run_steps))

    def unet_cost(self, run_steps: int, shallow_cost: float) -> float:
        """A run's UNet compute in whole-UNet steps, a shallow step costing ``shallow_cost``
        of a full one (measured: bench.step_cost)."""
        full = self.full_steps(run_steps)
        return full + (run_steps - full) * shallow_cost


NO_STEP_CACHE = StepCache()

"""The step cache's schedule and its spec (pure)."""

from __future__ import annotations

import re

import pytest

from core.errors import SettingError
from core.stepcache import StepCache


def test_off_runs_every_step_whole():
    off = StepCache.parse("off")
    assert not off.on and off.spec == "off"
    assert off.full_steps(25) == 25 and off.unet_cost(25, 0.2) == 25


def test_every_nth_step_of_a_run_is_whole_from_its_first():
    cache = StepCache.parse("deepcache:3")
    assert cache.on and cache.spec == "deepcache:3"
    assert [cache.full(done) for done in range(7)] == [True, False, False, True, False, False,
                                                       True]
    assert cache.full_steps(10) == 4 and cache.full_steps(1) == 1
    assert cache.unet_cost(10, 0.25) == pytest.approx(4 + 6 * 0.25)


@pytest.mark.parametrize("spec", ["deepcache:1", "deepcache:0", "deepcache", "deepcache:x",
                                  "on", "DeepCache:3", ""])
def test_a_bad_spec_is_refused_naming_it(spec):
    with pytest.raises(SettingError, match=re.escape(repr(spec))):
        StepCache.parse(spec)


def test_an_interval_below_one_is_refused():
    with pytest.raises(SettingError, match="interval 0"):
        StepCache(0)

"""The step cache's schedule and its spec (pure)."""

from __future__ import annotations

import re

import pytest

from core.errors import SettingError
from core.stepcache import StepCache


def test_off_runs_every_step_whole():
    off = StepCache.parse("off")
    assert not off.on and off.spec == "off"
    assert off.full_steps(0, 25) == 25 and off.unet_cost(0, 25, 0.2) == 25


def test_every_nth_step_of_a_run_is_whole_from_its_first():
    cache = StepCache.parse("deepcache:3")
    assert cache.on and cache.spec == "deepcache:3"
    assert [cache.full(step, 0, 10) for step in range(7)] == [True, False, False, True, False,
                                                              False, True]
    assert cache.full_steps(0, 10) == 4 and cache.full_steps(9, 10) == 1
    assert [cache.full(step, 4, 10) for step in range(4, 10)] == [True, False, False, True,
                                                                  False, False]
    assert cache.unet_cost(0, 10, 0.25) == pytest.approx(4 + 6 * 0.25)


def test_the_warm_up_runs_the_first_fraction_of_the_grid_whole():
    cache = StepCache.parse("deepcache:4:0.2")
    assert cache.spec == "deepcache:4:0.2" and cache.warm_steps(25) == 5
    # steps 0-4 whole, then 5, 9, 13, 17, 21 whole: 10 of 25
    assert [step for step in range(25) if cache.full(step, 0, 25)] == \
        [0, 1, 2, 3, 4, 5, 9, 13, 17, 21]
    # a resume from K 2 runs the rest of the warm-up whole; one from K 10 is past it
    assert cache.full_steps(2, 25) == 8
    assert [step for step in range(10, 25) if cache.full(step, 10, 25)] == [10, 14, 18, 22]
    assert cache.unet_cost(10, 25, 0.5) == pytest.approx(4 + 11 * 0.5)


@pytest.mark.parametrize("spec", ["deepcache:1", "deepcache:0", "deepcache", "deepcache:x",
                                  "on", "DeepCache:3", "deepcache:3:1.5", "deepcache:3:1",
                                  "deepcache:3:", ""])
def test_a_bad_spec_is_refused_naming_it(spec):
    with pytest.raises(SettingError, match=re.escape(repr(spec))):
        StepCache.parse(spec)


def test_an_interval_below_one_or_a_warm_up_of_the_whole_grid_is_refused():
    with pytest.raises(SettingError, match="interval 0"):
        StepCache(0)
    with pytest.raises(SettingError, match="warm-up 1.0"):
        StepCache(3, 1.0)

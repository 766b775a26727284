"""Eviction policies: one contract every policy passes, then each policy's own properties.
Time is injected (``now``); no I/O."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachemgr.policies import (
    FIFO,
    LCBFU,
    LFU,
    LRU,
    Budget,
    ItemStats,
    NoCache,
    policy_by_name,
    select_victims,
)

ALL = [LCBFU(), LCBFU(half_life_s=60.0), LRU(), LFU(), FIFO()]
NOW = 1000.0


def item(entry="e", k=5, size=10, created=0.0, hits=0, used=None) -> ItemStats:
    return ItemStats(entry=entry, k=k, size=size, created_at=created, hits=hits,
                     last_used_at=created if used is None else used)


items_strategy = st.lists(
    st.builds(item, entry=st.sampled_from("abcdef"), k=st.sampled_from([5, 10, 15, 20, 25]),
              size=st.integers(1, 100), created=st.floats(0, 900), hits=st.integers(0, 20)),
    max_size=40, unique_by=lambda i: (i.entry, i.k))


@pytest.mark.parametrize("policy", ALL, ids=lambda p: p.name)
@settings(max_examples=150, deadline=None)
@given(items=items_strategy, free_bytes=st.integers(0, 2000), free_items=st.integers(0, 30))
def test_contract_frees_enough_and_no_more_than_needed(policy, items, free_bytes, free_items):
    victims = select_victims(policy, items, free_bytes, free_items, NOW)
    assert len({v.member for v in victims}) == len(victims)
    assert set(victims) <= set(items)
    freed_bytes, freed_items = sum(v.size for v in victims), len(victims)
    if sum(i.size for i in items) >= free_bytes and len(items) >= free_items:
        assert freed_bytes >= free_bytes and freed_items >= free_items
    if victims:  # dropping the last victim would not have been enough
        assert (freed_bytes - victims[-1].size < free_bytes or freed_items - 1 < free_items)
    assert victims == select_victims(policy, list(reversed(items)), free_bytes, free_items, NOW)


@pytest.mark.parametrize("policy", ALL, ids=lambda p: p.name)
def test_contract_nothing_to_free_evicts_nothing(policy):
    assert select_victims(policy, [item(), item(k=10)], 0, 0, NOW) == []


@pytest.mark.parametrize("policy", ALL, ids=lambda p: p.name)
def test_contract_keep_recent_spares_the_last_item_of_a_recent_prompt(policy):
    recent = [item("hot", k=5, created=990.0), item("hot", k=10, created=990.0)]
    old = [item("cold", k=5, created=10.0), item("cold", k=10, created=10.0)]
    victims = select_victims(policy, recent + old, 0, 3, NOW, keep_recent_s=60.0)
    assert sorted(v.entry for v in victims) == ["cold", "cold", "hot"]


@pytest.mark.parametrize("policy", ALL, ids=lambda p: p.name)
def test_contract_keep_recent_never_breaks_the_budget(policy):
    recent = [item(f"hot{i}", k=5, created=990.0) for i in range(4)]
    victims = select_victims(policy, recent, 0, 3, NOW, keep_recent_s=60.0)
    assert len(victims) == 3  # all are protected, yet the budget is met


def test_no_cache_evicts_everything():
    items = [item(k=k) for k in (5, 10, 25)]
    assert set(select_victims(NoCache(), items, 0, 0, NOW)) == set(items)
    assert not NoCache().admits


def first_victim(policy, *items):
    return select_victims(policy, list(items), 0, 1, NOW)[0]


def test_lcbfu_hot_large_k_outlives_cold_small_k():
    hot, cold = item("a", k=25, hits=4), item("b", k=5, hits=1)
    assert first_victim(LCBFU(), hot, cold) == cold


def test_lcbfu_never_hit_goes_before_hit():
    never, once = item("a", k=25, hits=0), item("b", k=5, hits=1)
    assert first_victim(LCBFU(), never, once) == never


def test_lcbfu_ties_older_first_then_smaller_k():
    older, newer = item("a", k=10, hits=1, created=1.0), item("b", k=10, hits=1, created=2.0)
    assert first_victim(LCBFU(), newer, older) == older
    small, large = item("a", k=5, hits=0, created=1.0), item("a", k=10, hits=0, created=1.0)
    assert first_victim(LCBFU(), large, small) == small


def test_lcbfu_decay_cools_items_hot_long_ago_and_ranks_unhit_by_k():
    decay = LCBFU(half_life_s=60.0)
    stale = item("a", k=25, hits=10, created=0.0, used=100.0)   # 900 s idle: 15 half-lives
    fresh = item("b", k=5, hits=0, created=990.0)
    assert first_victim(decay, stale, fresh) == stale
    assert first_victim(LCBFU(), stale, fresh) == fresh          # plain LCBFU keeps the stale
    assert first_victim(decay, item("c", k=25, created=990.0), fresh) == fresh


def test_lru_lfu_fifo_orders():
    a = item("a", created=1.0, hits=5, used=900.0)
    b = item("b", created=2.0, hits=1, used=950.0)
    c = item("c", created=3.0, hits=9, used=100.0)
    assert first_victim(LRU(), a, b, c) == c
    assert first_victim(LFU(), a, b, c) == b
    assert first_victim(FIFO(), a, b, c) == a


def test_policy_by_name():
    assert policy_by_name("lcbfu") == LCBFU()
    assert policy_by_name("lcbfu", half_life_s=30).half_life_s == 30
    assert policy_by_name("lru").name == "lru"
    decay = LCBFU(half_life_s=3600.0)
    assert policy_by_name(decay.name) == decay and decay.name == "lcbfu-decay3600s"
    with pytest.raises(ValueError, match="'arc' unknown"):
        policy_by_name("arc")


def test_budget_excess_down_to_low_water():
    budget = Budget(max_bytes=1000, max_items=10, low_water=0.8)
    assert not budget.over(1000, 10) and budget.excess(1000, 10) == (0, 0)
    assert budget.over(1001, 5) and budget.excess(1001, 5) == (201, 0)
    assert budget.excess(500, 11) == (0, 3)
    assert not Budget().over(10**12, 10**9)  # 0 = no limit
    with pytest.raises(ValueError):
        Budget(low_water=0.0)

"""Similarity -> K, hole fallback, partitions and the triage cache decision (pure)."""

from __future__ import annotations

import pytest

from cachemgr.keys import cache_scope, latent_key, partition_key
from cachemgr.ktable import REFERENCE_TABLE, KTable, derive_table, largest_stored_at_most
from cachemgr.routing import Bounds, CachedEntry, decide
from core.errors import SettingError
from core.plan import Lineage, Reason, Segment


@pytest.mark.parametrize("similarity, k", [
    (1.0, 25), (0.95, 25), (0.9499, 20), (0.90, 20), (0.85, 15), (0.8499, 10), (0.75, 10),
    (0.65, 5), (0.6499, None), (-1.0, None),
])
def test_reference_table_edges_at_50_steps(similarity, k):
    assert REFERENCE_TABLE.k_for(similarity, 50) == k


@pytest.mark.parametrize("steps, similarity, k", [
    (10, 0.99, 5), (10, 0.66, 1), (100, 0.96, 50), (20, 0.9, 8), (2, 0.99, 1), (1, 0.99, None),
])
def test_k_scales_with_steps(steps, similarity, k):
    assert REFERENCE_TABLE.k_for(similarity, steps) == k


def test_k_set_scales_and_stays_inside_the_run():
    assert REFERENCE_TABLE.k_set(50) == {5, 10, 15, 20, 25}
    assert REFERENCE_TABLE.k_set(10) == {1, 2, 3, 4, 5}
    assert REFERENCE_TABLE.k_set(1) == frozenset()
    assert all(0 < k < 7 for k in REFERENCE_TABLE.k_set(7))


def test_table_round_trips_as_data_and_rejects_bad_rows(tmp_path):
    path = tmp_path / "table.json"
    path.write_text(REFERENCE_TABLE.to_json())
    assert KTable.load(str(path)) == REFERENCE_TABLE
    assert KTable.load("reference") is REFERENCE_TABLE
    with pytest.raises(ValueError, match="strictly decrease"):
        KTable("bad", ((0.5, 5), (0.9, 20)))
    with pytest.raises(ValueError, match="bad row"):
        KTable("bad", ((0.9, 50),))


def test_a_profiled_table_keeps_the_largest_k_within_tolerance():
    ratios = {
        0.95: {4: 1.0, 8: 0.99, 12: 0.97, 16: 0.90},
        0.90: {4: 1.0, 8: 0.96, 12: 0.93, 16: 0.97},   # 16 passes, but 12 fails first
        0.80: {4: 0.98, 8: 0.97, 12: 0.96, 16: 0.50},  # would allow 12; capped by 0.90's 8
        0.70: {4: 0.96, 8: 0.80, 12: 0.70, 16: 0.60},
        0.60: {4: 0.90, 8: 0.80, 12: 0.70, 16: 0.60},  # nothing kept: a miss from here down
        0.50: {4: 0.99, 8: 0.99, 12: 0.99, 16: 0.99},  # below a miss: stays a miss
    }
    table = derive_table("profiled", 20, ratios, tolerance=0.95)
    assert table.thresholds == ((0.95, 12), (0.80, 8), (0.70, 4))
    assert table.reference_steps == 20
    assert table.k_for(0.97, 20) == 12 and table.k_for(0.85, 20) == 8
    assert table.k_for(0.65, 20) is None
    assert table.k_for(0.97, 40) == 24  # scales with the job's steps like any table
    assert KTable.from_json(table.to_json()) == table


def test_a_table_names_the_step_cache_its_profile_chose():
    table = KTable("profiled", ((0.9, 10),), 25, step_cache="deepcache:2")
    assert KTable.from_json(table.to_json()) == table
    assert KTable.from_json(REFERENCE_TABLE.to_json()).step_cache == "off"
    without = '{"name": "older", "reference_steps": 25, "thresholds": [[0.9, 10]]}'
    assert KTable.from_json(without).step_cache == "off"
    with pytest.raises(SettingError, match="'deepcache:x'"):
        KTable("bad", ((0.9, 10),), 25, step_cache="deepcache:x")


def test_a_profile_where_nothing_keeps_quality_derives_no_table():
    with pytest.raises(ValueError, match="no similarity bin keeps 95%"):
        derive_table("profiled", 20, {0.9: {4: 0.5}}, tolerance=0.95)


def test_hole_fallback_takes_largest_stored_k_at_most():
    assert largest_stored_at_most(20, {5, 10, 25}) == 10
    assert largest_stored_at_most(20, {20}) == 20
    assert largest_stored_at_most(5, {10, 15}) is None
    assert largest_stored_at_most(5, set()) is None


def test_partitions_separate_everything_that_changes_a_latent():
    base = dict(model="m", scheduler="ddim", step_cache="off", steps=50, width=512, height=512, guidance=7.5,
                scope=cache_scope("acme", shared=False))
    key = partition_key(**base)
    assert partition_key(**base) == key
    for field, other in [("model", "m2"), ("scheduler", "euler"),
                         ("step_cache", "deepcache:3"), ("steps", 30),
                         ("width", 256), ("height", 768), ("guidance", 7.0),
                         ("scope", cache_scope("globex", shared=False)),
                         ("adapters", "ab12@1"), ("adapters", "ab12@0.5")]:
        assert partition_key(**{**base, field: other}) != key, field
    assert cache_scope("acme", shared=True) == cache_scope("globex", shared=True)
    assert latent_key(key, "e1", 5) == f"cache/{key}/e1/k005.safetensors"


def own(entry, seed=0, steps=50):
    return Lineage.own(entry, f"prompt of {entry}", steps, seed)


def stored(ks, seed=0):
    return lambda entry: CachedEntry(frozenset(ks), own(entry, seed))


def bounds(seed=0, seed_cap=None, lineage=True, ancestors=None, steps=50):
    similarities = ancestors or {}
    return Bounds(REFERENCE_TABLE, steps, seed, seed_cap, lineage,
                  lambda segment: similarities[segment.source])


def test_decide_hit_hole_and_misses():
    assert decide([], stored({5}), bounds()).reason is Reason.MISS
    below = decide([("e", 0.5)], stored({5}), bounds())
    assert below.reason is Reason.BELOW_THRESHOLD and not below.resume and below.similarity == 0.5
    hit = decide([("e", 0.97)], stored({5, 10, 15, 20, 25}), bounds())
    assert (hit.reason, hit.k, hit.wanted_k, hit.entry) == (Reason.HIT, 25, 25, "e")
    hole = decide([("e", 0.97)], stored({5, 15}), bounds())
    assert (hole.reason, hole.k, hole.wanted_k) == (Reason.HOLE, 15, 25) and hole.resume
    empty = decide([("e", 0.7)], stored({10, 25}), bounds())
    assert (empty.reason, empty.resume, empty.wanted_k) == (Reason.NO_STORED_K, False, 5)
    gone = decide([("e", 0.97)], lambda entry: None, bounds())
    assert (gone.reason, gone.resume) == (Reason.NO_STORED_K, False)


def test_decide_weighs_the_nearest_few_for_the_largest_k():
    ks = {"resumed": frozenset({15, 20, 25}), "full": frozenset({5, 10, 15, 20, 25}),
          "full2": frozenset({5, 10, 15, 20, 25})}

    def entries(entry):
        return CachedEntry(ks[entry], own(entry))
    # The nearest was kept by a job resumed at K=10: nothing at or below the K=10 earned.
    farther = decide([("resumed", 0.80), ("full", 0.78)], entries, bounds())
    assert (farther.reason, farther.entry, farther.k) == (Reason.HIT, "full", 10)
    # A tie in K goes to the nearer; a farther entry without the hole wins over it.
    tie = decide([("full", 0.96), ("full2", 0.955)], entries, bounds())
    assert (tie.entry, tie.k) == ("full", 25)
    ks["holed"] = frozenset({5})
    larger = decide([("holed", 0.96), ("full", 0.955)], entries, bounds())
    assert (larger.reason, larger.entry, larger.k) == (Reason.HIT, "full", 25)
    # No usable match: the nearest's reason.
    none = decide([("resumed", 0.70), ("full", 0.5)], entries, bounds())
    assert (none.reason, none.entry, none.resume) == (Reason.NO_STORED_K, "resumed", False)


def chained_b():
    """B resumed from A at K=10, keeping its latents at K 15, 20, 25: steps 1-10 are A's."""
    lineage = Lineage((Segment("A", "prompt a", 10), Segment("B", "prompt b", 50)), 0)
    return lambda entry: CachedEntry(frozenset({15, 20, 25}), lineage)


def test_a_chain_takes_no_more_steps_from_the_first_prompt_than_its_similarity_allows():
    """A -> B at K 10, then C at 0.96 to B would resume at K 25: it may only if C is near
    enough to A for K 10 (the reference table: 0.75), since steps 1-10 came from A."""
    far_from_a = decide([("B", 0.96)], chained_b(), bounds(ancestors={"A": 0.70}))
    assert (far_from_a.reason, far_from_a.resume, far_from_a.wanted_k) == (
        Reason.LINEAGE_CAP, False, 25)
    near_a = decide([("B", 0.96)], chained_b(), bounds(ancestors={"A": 0.80}))
    assert (near_a.reason, near_a.k) == (Reason.HIT, 25)
    # The old rule (lineage ignored) took K 25 whatever A was.
    old = decide([("B", 0.96)], chained_b(), bounds(lineage=False, ancestors={"A": 0.1}))
    assert old.k == 25


def test_a_chain_falls_back_to_a_smaller_k_the_lineage_allows():
    """C is 0.96 to B and 0.80 to A (K 10 from A); with K 25 evicted it takes K 20."""
    lineage = Lineage((Segment("A", "prompt a", 10), Segment("B", "prompt b", 50)), 0)
    decision = decide([("B", 0.96)], lambda entry: CachedEntry(frozenset({15, 20}), lineage),
                      bounds(ancestors={"A": 0.80}))
    assert (decision.reason, decision.k) == (Reason.HOLE, 20)
    # A at 0.70 grants 5 < 10: no K of B is usable; another candidate still can be.
    full = {"B": CachedEntry(frozenset({15, 20}), lineage),
            "D": CachedEntry(frozenset({5, 10, 15}), own("D"))}
    other = decide([("B", 0.96), ("D", 0.80)], full.get, bounds(ancestors={"A": 0.70}))
    assert (other.entry, other.k, other.reason) == ("D", 10, Reason.HIT)


def test_a_seed_cap_bounds_hits_from_another_seeds_latent_only():
    entries = stored({5, 10, 15, 20, 25}, seed=7)
    same_seed = decide([("e", 0.97)], entries, bounds(seed=7, seed_cap=10))
    assert (same_seed.reason, same_seed.k) == (Reason.HIT, 25)
    reroll = decide([("e", 0.97)], entries, bounds(seed=8, seed_cap=10))
    assert (reroll.reason, reroll.k, reroll.wanted_k) == (Reason.SEED_CAP, 10, 25)
    uncapped = decide([("e", 0.97)], entries, bounds(seed=8))
    assert uncapped.k == 25
    below_every_stored_k = decide([("e", 0.97)], entries, bounds(seed=8, seed_cap=2))
    assert (below_every_stored_k.reason, below_every_stored_k.k) == (Reason.SEED_CAP, None)

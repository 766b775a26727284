"""cachemgr.plan: the seed policy's plans, the Ks a job keeps and the lineage it records
(pure; the index and the entries are in-memory stand-ins for Chroma and the catalog)."""

from __future__ import annotations

import numpy as np
import pytest

from cachemgr.ktable import REFERENCE_TABLE, KTable
from cachemgr.plan import (
    DEFAULT_SEED_POLICY,
    OLD_RULES,
    Query,
    ReuseRules,
    SeedPolicy,
    kept_ks,
    lineage_after,
    plan_reuse,
)
from cachemgr.predictor import AlwaysLookUp
from cachemgr.routing import CachedEntry
from core.plan import CachePlan, Lineage, Reason, Route, SeedRule, Segment

ENTRY_SEED = 7


class OneEntryIndex:
    def nearest(self, embedding: np.ndarray, partition: str, n: int) -> list[tuple[str, float]]:
        return [("e", 0.97)]   # K 25 of 50 in the reference table


def reuse(seed: int, policy: SeedPolicy | None, steps: int = 50,
          stored: frozenset[int] = frozenset(range(1, 50))) -> CachePlan:
    entry = CachedEntry(stored, Lineage.own("e", "a fox", steps, ENTRY_SEED))
    return plan_reuse(Query(np.ones(3), "p", steps, seed), OneEntryIndex(), lambda _: entry,
                      lambda _: 0.0, REFERENCE_TABLE, AlwaysLookUp(), 0.0, lambda: 1.0,
                      ReuseRules(seed=policy))


def test_the_default_policy_swaps_noise_and_caps_k_at_2_of_50():
    same_seed = reuse(ENTRY_SEED, DEFAULT_SEED_POLICY)
    assert (same_seed.k, same_seed.reseed, same_seed.reason) == (25, None, Reason.HIT)
    reroll = reuse(ENTRY_SEED + 1, DEFAULT_SEED_POLICY)
    assert (reroll.k, reroll.reason) == (2, Reason.SEED_CAP)
    assert reroll.reseed is not None and reroll.reseed.rule is SeedRule.NOISE_SWAP
    assert (reroll.reseed.source_seed, reroll.reseed.run_from) == (ENTRY_SEED, 2)
    assert reroll.steps_saved == 2
    ten_steps = reuse(ENTRY_SEED + 1, DEFAULT_SEED_POLICY, steps=10)  # 4% of 10 is 0
    assert (ten_steps.route, ten_steps.reason) == (Route.FULL, Reason.SEED_CAP)


@pytest.mark.parametrize("steps, cap", [(10, 0), (24, 0), (25, 1), (49, 1), (50, 2), (75, 3)])
def test_the_seed_cap_is_a_fraction_of_the_jobs_steps_rounded_down(steps, cap):
    assert DEFAULT_SEED_POLICY.cap(steps) == cap


@pytest.mark.parametrize("k, run_from", [(1, 0), (2, 1), (4, 2), (10, 5)])
def test_renoise_runs_from_below_k(k, run_from):
    plan = reuse(ENTRY_SEED + 1, SeedPolicy(SeedRule.RENOISE, max_fraction=k / 50),
                 stored=frozenset({k}))
    assert plan.k == k and plan.reseed is not None and plan.reseed.run_from == run_from


def test_a_full_generation_keeps_the_seed_cap_k_too():
    assert kept_ks(None, REFERENCE_TABLE, 50, True) == {2, 5, 10, 15, 20, 25}
    profiled_at_20 = KTable("profiled", ((0.99, 16), (0.95, 8)), reference_steps=20)
    assert kept_ks(None, profiled_at_20, 25, True) == {1, 10, 20}
    assert kept_ks(None, REFERENCE_TABLE, 25, True) == REFERENCE_TABLE.k_set(25) | {1}
    assert kept_ks(None, REFERENCE_TABLE, 10, True) == REFERENCE_TABLE.k_set(10)  # cap 0
    assert kept_ks(None, REFERENCE_TABLE, 50, True, OLD_RULES) == REFERENCE_TABLE.k_set(50)


def test_resumed_and_exact_jobs_keep_only_their_own_steps():
    resumed = reuse(ENTRY_SEED + 1, DEFAULT_SEED_POLICY)   # from K 2
    assert kept_ks(resumed, REFERENCE_TABLE, 50, True) == {5, 10, 15, 20, 25}
    assert kept_ks(resumed, REFERENCE_TABLE, 50, admit_resumed=False) == frozenset()
    exact = CachePlan(Route.EXACT, Reason.EXACT_REPEAT, entry="e", k=50)
    assert kept_ks(exact, REFERENCE_TABLE, 50, True) == frozenset()


def test_lineage_after_a_noise_swap_carries_the_jobs_seed_and_a_renoise_the_entrys():
    swapped = reuse(ENTRY_SEED + 1, DEFAULT_SEED_POLICY)
    after = lineage_after(swapped, "j", "a fox, red", 50, ENTRY_SEED + 1, "off")
    assert after.segments == (Segment("e", "a fox", 2), Segment("j", "a fox, red", 50))
    assert after.noise_seed == ENTRY_SEED + 1
    renoised = reuse(ENTRY_SEED + 1, SeedPolicy(SeedRule.RENOISE, max_fraction=0.2))
    assert lineage_after(renoised, "j", "a fox", 50, ENTRY_SEED + 1, "off").noise_seed == \
        ENTRY_SEED
    assert lineage_after(None, "j", "a fox", 50, 3, "off") == Lineage.own("j", "a fox", 50, 3)


def test_a_lineage_says_which_step_cache_made_its_latents():
    made = lineage_after(None, "j", "a fox", 50, 3, "deepcache:3")
    resumed = lineage_after(reuse(ENTRY_SEED + 1, DEFAULT_SEED_POLICY), "j", "a fox", 50,
                            ENTRY_SEED + 1, "deepcache:3")
    assert made.step_cache == resumed.step_cache == "deepcache:3"
    assert Lineage.from_dict(made.to_dict()) == made
    before = {key: value for key, value in made.to_dict().items() if key != "step_cache"}
    assert Lineage.from_dict(before).step_cache == "off"   # kept before step caches


class PartitionIndex:
    """Entries by partition: the LoRA job's own partition is empty, the base model's not."""

    def __init__(self, by_partition: dict[str, list[tuple[str, float]]]) -> None:
        self.by_partition, self.asked = by_partition, []

    def nearest(self, embedding: np.ndarray, partition: str, n: int) -> list[tuple[str, float]]:
        self.asked.append(partition)
        return self.by_partition.get(partition, [])


def lora_reuse(index: PartitionIndex, lora_from: int, seed: int = ENTRY_SEED) -> CachePlan:
    entry = CachedEntry(frozenset({2, 5, 10, 15, 20, 25}), Lineage.own("e", "a fox", 50,
                                                                        ENTRY_SEED))
    return plan_reuse(Query(np.ones(3), "lora", 50, seed, base=("base", lora_from)), index,
                      lambda _: entry, lambda _: 0.0, REFERENCE_TABLE, AlwaysLookUp(), 0.0,
                      lambda: 1.0)


def test_a_lora_job_resumes_a_base_model_latent_up_to_where_its_lora_starts():
    index = PartitionIndex({"base": [("e", 0.97)]})       # K 25 earned
    plan = lora_reuse(index, lora_from=10)
    assert (plan.route, plan.partition, plan.k, plan.reason) == (
        Route.RESUME, "base", 10, Reason.ADAPTER_CAP)
    assert index.asked == ["lora", "base"]
    assert lora_reuse(PartitionIndex({"base": [("e", 0.97)]}), lora_from=12).k == 10  # stored
    reroll = lora_reuse(PartitionIndex({"base": [("e", 0.97)]}), lora_from=10,
                        seed=ENTRY_SEED + 1)                # the seed cap still applies
    assert (reroll.k, reroll.reason) == (2, Reason.SEED_CAP)


def test_a_lora_jobs_own_partition_comes_first_and_no_lora_from_means_no_base_hit():
    own = PartitionIndex({"lora": [("e", 0.97)], "base": [("e", 0.99)]})
    plan = lora_reuse(own, lora_from=10)
    assert (plan.partition, plan.k, plan.reason) == ("lora", 25, Reason.HIT)
    assert own.asked == ["lora"]
    index = PartitionIndex({"base": [("e", 0.97)]})
    plan = lora_reuse(index, lora_from=0)
    assert (plan.route, plan.partition) == (Route.FULL, "lora") and index.asked == ["lora"]
    far = lora_reuse(PartitionIndex({"base": [("e", 0.5)]}), lora_from=10)
    assert (far.route, far.partition, far.reason) == (Route.FULL, "lora", Reason.MISS)

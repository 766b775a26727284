"""The cache simulator on small synthetic traces (pure)."""

from __future__ import annotations

import numpy as np

from cachemgr.ktable import REFERENCE_TABLE
from cachemgr.plan import OLD_RULES, ReuseRules, SeedPolicy
from cachemgr.policies import LCBFU, LRU, NoCache
from cachemgr.simulator import (
    ExactIndex,
    PredictorConfig,
    SimConfig,
    SimRequest,
    earlier_neighbours,
    simulate,
)
from core.plan import Reason, SeedRule

# The live rules without the seed cap: the tests of K tables and lineage use it, so that
# hits from other seeds reach the Ks those rules allow.
UNCAPPED = ReuseRules(seed=SeedPolicy(SeedRule.NOISE_SWAP))


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_exact_index_add_remove_nearest():
    embeddings = np.stack([unit([1, 0, 0]), unit([0, 1, 0]), unit([1, 1, 0])])
    index = ExactIndex(embeddings)
    for row in range(3):
        index.add("p", row)
    assert [row for row, _ in index.nearest("p", unit([1, 0.1, 0]), n=2)] == [0, 2]
    index.remove(0)
    assert index.nearest("p", unit([1, 0.1, 0]))[0][0] == 2
    index.remove(2)
    index.remove(1)
    assert index.nearest("p", unit([1, 0, 0])) == [] and index.nearest("q", unit([1, 0, 0])) == []


def trace(prompts_and_vectors, user="u", seeds=None):
    requests = [SimRequest(user, prompt, 50, "p", seed)
                for (prompt, _), seed in zip(prompts_and_vectors,
                                             seeds or [0] * len(prompts_and_vectors))]
    embeddings = np.stack([unit(v) for _, v in prompts_and_vectors])
    return requests, embeddings, [float(i) for i in range(len(requests))]


def test_identical_repeat_is_exact_another_seed_resumes_at_the_seed_cap():
    """An identical request (prompt and seed) is served whole; a re-roll and a near edit
    from another seed resume from K 2 of 50 only (the default seed cap), with the noise
    swapped for their own seed's; a near edit from the same seed earns its table K."""
    requests, embeddings, times = trace(
        [("a", [1, 0, 0]), ("a", [1, 0, 0]), ("a", [1, 0, 0]), ("a2", [1, 0.45, 0]),
         ("a3", [1, 0.45, 0.01]), ("z", [0, 0, 1])], seeds=[1, 1, 2, 3, 1, 4])
    result = simulate(requests, embeddings, times,
                      SimConfig(LCBFU(), REFERENCE_TABLE, keep_plans=True))
    near_k = REFERENCE_TABLE.k_for(float(unit([1, 0, 0]) @ unit([1, 0.45, 0.01])), 50)
    assert near_k is not None and near_k > 2
    assert result.hit_flags == [False, True, True, True, True, False]
    assert result.k_histogram == {2: 2, near_k: 1}    # resumes only: the exact one ran none
    assert result.hits_by_kind == {"exact": 1, "re-roll": 1, "near edit": 2}
    assert result.steps_saved_by_kind == {"exact": 50, "re-roll": 2, "near edit": 2 + near_k}
    exact, reroll, edit, same_seed_edit = result.plans[1:5]
    assert (str(exact.route), exact.entry, exact.steps_saved) == ("exact", "0", 50)
    for capped in (reroll, edit):
        assert capped.k == 2 and capped.reason is Reason.SEED_CAP
        assert capped.reseed is not None and capped.reseed.rule is SeedRule.NOISE_SWAP
        assert capped.reseed.source_seed == 1
    assert same_seed_edit.reseed is None and same_seed_edit.entry == "0"
    # the runs the step cache's compute figures start from: the exact one ran no step
    assert result.runs == {(50, 0): 2, (50, 50): 1, (50, 2): 2, (50, near_k): 1}
    assert sum((n - start) * c for (n, start), c in result.runs.items()) == \
        result.steps_requested - result.steps_saved


def test_without_the_seed_cap_another_seed_resumes_at_its_table_k():
    requests, embeddings, times = trace(
        [("a", [1, 0, 0]), ("a", [1, 0, 0]), ("a", [1, 0, 0]), ("a2", [1, 0.45, 0]),
         ("z", [0, 0, 1])], seeds=[1, 1, 2, 3, 4])
    result = simulate(requests, embeddings, times,
                      SimConfig(LCBFU(), REFERENCE_TABLE, keep_plans=True, rules=UNCAPPED))
    near_k = REFERENCE_TABLE.k_for(float(unit([1, 0, 0]) @ unit([1, 0.45, 0])), 50)
    assert result.hits == 3 and result.hit_flags == [False, True, True, True, False]
    assert result.k_histogram == {25: 1, near_k: 1}
    assert result.steps_saved == 50 + 25 + near_k and result.steps_requested == 250
    assert result.steps_saved_by_kind == {"exact": 50, "re-roll": 25, "near edit": near_k}
    reroll = result.plans[2]
    assert reroll.reseed is not None and (reroll.reseed.source_seed, reroll.k) == (1, 25)
    assert (result.hits_same_user, result.hits_cross_user, result.hits_user_unknown) == (3, 0, 0)


def test_old_rules_resume_identical_repeats_and_ignore_seeds():
    requests, embeddings, times = trace([("a", [1, 0, 0])] * 3, seeds=[1, 1, 2])
    result = simulate(requests, embeddings, times,
                      SimConfig(LCBFU(), REFERENCE_TABLE, keep_plans=True, rules=OLD_RULES))
    assert result.hits_by_kind == {"exact": 1, "re-roll": 1} and result.steps_saved == 50
    assert all(plan.reseed is None for plan in result.plans if plan)


def test_a_resumed_job_keeps_its_latents_above_its_k_for_later_rerolls():
    """b resumes from a at K=10; b's re-roll then resumes from b's own latent at K=25 (a
    chain: a ran its first 10 steps, near enough to b for K 10) when resumed jobs are
    admitted, else from a at K=10 again."""
    requests, embeddings, times = trace([("a", [1, 0, 0]), ("b", [1, 0.75, 0]),
                                         ("b", [1, 0.75, 0])], seeds=[1, 2, 3])
    kept = simulate(requests, embeddings, times,
                    SimConfig(LCBFU(), REFERENCE_TABLE, rules=UNCAPPED))
    assert kept.k_histogram == {10: 1, 25: 1} and kept.max_items == 5 + 3  # b: K 15, 20, 25
    assert kept.hits_by_kind == {"near edit": 1, "chained": 1}
    dropped = simulate(requests, embeddings, times,
                       SimConfig(LCBFU(), REFERENCE_TABLE, admit_resumed=False,
                                 rules=UNCAPPED))
    assert dropped.k_histogram == {10: 2} and dropped.max_items == 5


def test_a_chain_is_capped_by_the_first_prompt_of_its_lineage():
    """a -> b at K 10 (0.80); c is 0.99 to b but only 0.71 to a (K 5 < the 10 steps a
    ran): c may not resume from b's latents, only from a at K 5; the old rule let it take
    K 25 from b."""
    a, b, c = (unit([np.cos(np.radians(angle)), np.sin(np.radians(angle)), 0])
               for angle in (0, 37, 45))
    assert 0.75 <= float(a @ b) < 0.85 and float(b @ c) >= 0.95 and float(a @ c) < 0.75
    requests, embeddings, times = trace([("a", a), ("b", b), ("c", c)], seeds=[1, 2, 3])
    new = simulate(requests, embeddings, times,
                   SimConfig(LCBFU(), REFERENCE_TABLE, keep_plans=True, rules=UNCAPPED))
    old = simulate(requests, embeddings, times,
                   SimConfig(LCBFU(), REFERENCE_TABLE, keep_plans=True, rules=OLD_RULES))
    assert old.plans[2].entry == "1" and old.plans[2].k == 25
    capped = new.plans[2]
    assert capped.k == REFERENCE_TABLE.k_for(float(a @ c), 50) and capped.entry == "0"


def test_hits_between_unknown_users_are_not_called_same_or_cross_user():
    requests, embeddings, times = trace([("a", [1, 0, 0]), ("a", [1, 0, 0])], user="")
    result = simulate(requests, embeddings, times, SimConfig(LCBFU(), REFERENCE_TABLE))
    assert (result.hits_same_user, result.hits_cross_user, result.hits_user_unknown) == (0, 0, 1)


def test_no_cache_never_hits():
    requests, embeddings, times = trace([("a", [1, 0, 0])] * 3)
    result = simulate(requests, embeddings, times, SimConfig(NoCache(), REFERENCE_TABLE))
    assert result.hits == 0 and result.lookups == 0 and result.max_items == 0


def test_budget_bounds_the_items():
    rng = np.random.default_rng(0)
    requests, embeddings, times = trace([(str(i), rng.normal(size=16)) for i in range(60)])
    result = simulate(requests, embeddings, times,
                      SimConfig(LCBFU(), REFERENCE_TABLE, budget_prompts=4, low_water=0.5))
    assert result.evictions > 0 and result.max_items <= 4 * 5 + 5


def test_predictor_is_trained_and_scored():
    rng = np.random.default_rng(1)
    centre = rng.normal(size=64)
    pairs = []
    for i in range(400):  # half near-repeats of a theme, half unrelated (64-d: far apart)
        vector = centre + 0.05 * rng.normal(size=64) if i % 2 else rng.normal(size=64)
        pairs.append((str(i), vector))
    requests, embeddings, times = trace(pairs)
    config = SimConfig(LCBFU(), REFERENCE_TABLE,
                       predictor=PredictorConfig(min_samples=40, retrain_every=100, nu=0.1))
    result = simulate(requests, embeddings, times, config)
    confusion = result.predictor_confusion
    assert sum(confusion.values()) == 300  # scored from the first training on (request 100)
    # Trained, as live triage trains it, only on prompts whose real lookup hit (40-150
    # samples here), it lets about half the would-be hits through (recall) and turns away
    # nearly every unrelated prompt. (The simulator once also learned from hits the
    # predictor had skipped, which no live lookup sees: recall was 0.65 then.)
    assert confusion["tp"] / (confusion["tp"] + confusion["fn"]) >= 0.45
    assert confusion["tn"] / (confusion["tn"] + confusion["fp"]) >= 0.9


def test_top1_similarity_profile_stays_in_partitions():
    requests = [SimRequest("u", "a", 50, "p"), SimRequest("u", "b", 50, "q"),
                SimRequest("u", "c", 50, "p")]
    embeddings = np.stack([unit([1, 0]), unit([1, 0]), unit([1, 1])])
    profile = earlier_neighbours(requests, embeddings).top1()
    assert np.isnan(profile[0]) and np.isnan(profile[1])
    assert profile[2] == np.float32(unit([1, 0]) @ unit([1, 1]))


def clustered_trace(n=400, seed=0):
    """Prompts drawn from a few themes with small edits and exact repeats, two partitions."""
    rng = np.random.default_rng(seed)
    themes = rng.normal(size=(12, 8))
    requests, vectors = [], []
    for i in range(n):
        if i and rng.random() < 0.3:                       # an exact repeat of an earlier one
            j = int(rng.integers(i))
            requests.append(requests[j])
            vectors.append(vectors[j])
            continue
        vectors.append(unit(themes[rng.integers(12)] + rng.normal(scale=0.35, size=8)))
        requests.append(SimRequest(f"u{i % 3}", f"p{i}", 50, "pq"[i % 2]))
    return requests, np.stack(vectors), [float(i) for i in range(n)]


def test_earlier_neighbours_match_a_brute_force_search():
    requests, embeddings, _ = clustered_trace()
    found = earlier_neighbours(requests, embeddings, k=4, block=7)
    for i, request in enumerate(requests):
        earlier = {}                                       # key -> similarity, first seen < i
        for j in range(i):
            if requests[j].partition == request.partition:
                earlier.setdefault(requests[j].prompt, float(embeddings[j] @ embeddings[i]))
        expected = sorted(earlier.values(), reverse=True)[:4]
        got = found.similarities[i][found.keys[i] >= 0]
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        assert found.key_of[i] == found.key_of[requests.index(request)]


def test_few_neighbours_with_cache_scans_give_the_same_replay_as_many():
    """k=2 forces the scan of the cache whenever both neighbours were evicted or never
    cached; the replay must not change."""
    requests, embeddings, times = clustered_trace()
    for policy, budget, admit in ((LRU(), 6, True), (LCBFU(), 0, True), (LRU(), 6, False)):
        config = SimConfig(policy, REFERENCE_TABLE, budget_prompts=budget, admit_resumed=admit)
        few = simulate(requests, embeddings, times, config, earlier_neighbours(requests, embeddings, k=2))
        many = simulate(requests, embeddings, times, config,
                        earlier_neighbours(requests, embeddings, k=len(requests)))
        assert few.hits > 20 and few.evictions == many.evictions
        assert (few.hit_flags, few.steps_saved, few.k_histogram) == (
            many.hit_flags, many.steps_saved, many.k_histogram)

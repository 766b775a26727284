"""Offline replay: a trace through the project's cache logic, generation simulated.

    python -m bench.replay --limit 20000 --policies lcbfu,lru,lfu,fifo,none --budgets 1000,0
    python -m bench.replay --limit 20000 --predictor-eval

Channels are interleaved by a seeded random merge (each keeps its order); arrivals are
Poisson at --rate. Each request keeps the trace's steps (50 when empty), size and guidance,
which make its cache partition. Prompt embeddings are computed once (batched, progress bar)
and kept on disk by embedder and prompt (bench/embeddings.py), and so is each request's list
of most similar earlier prompts, from which the simulator answers its exact top-1 lookups.
Budgets are in prompts' worth of items (5 items a prompt); 0 is unbounded. Writes JSON
(a ``rows`` list), Markdown and plots.

--predictor-eval runs LCBFU unbounded with and without the match predictor and reports its
precision and recall against what the lookup would have said, the lookups it skipped, and
the lookup time that saves (Chroma's top-1 query time measured here on the same prompts).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.embeddings import DEFAULT_CACHE_DIR, EmbeddingStore
from cachemgr.keys import cache_scope, partition_key
from cachemgr.ktable import KTable
from cachemgr.plan import OLD_RULES, ReuseRules, SeedPolicy
from cachemgr.policies import policy_by_name
from cachemgr.predictor import train_predictor
from cachemgr.routing import LOOKUP_CANDIDATES
from cachemgr.simulator import (
    Neighbours,
    PredictorConfig,
    SimConfig,
    SimRequest,
    SimResult,
    earlier_neighbours,
    simulate,
)
from core.plan import SeedRule
from core.stepcache import OFF
from core.trace import DEFAULT_TRACE, TraceRequest, interleaved, read_trace


def neighbours_for(requests: list[SimRequest], embeddings: np.ndarray, cache_dir: Path,
                   k: int = 32) -> Neighbours:
    """``earlier_neighbours``, cached on disk by the requests and their embeddings."""
    digest = hashlib.sha256(embeddings.tobytes())
    digest.update("\n".join(f"{r.partition}\t{r.prompt}" for r in requests).encode())
    path = cache_dir / f"neighbours-{len(requests)}-k{k}-{digest.hexdigest()[:20]}.npz"
    if path.exists():
        with np.load(path) as saved:
            return Neighbours(saved["key_of"], saved["keys"], saved["similarities"])
    with tqdm(total=len(requests), desc="nearest earlier prompts", unit="request") as bar:
        found = earlier_neighbours(requests, embeddings, k=k, progress=bar.update)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, key_of=found.key_of, keys=found.keys, similarities=found.similarities)
    return found


def sim_requests(trace: list[TraceRequest], per_user: bool) -> list[SimRequest]:
    """Partitions as the live system makes them; ``per_user`` treats each trace user as a
    tenant (T2I_CACHE_SCOPE=tenant), else one shared cache. A request without a user id is
    then a tenant of its own (it reuses nothing), so isolation's cost is not understated."""
    return [SimRequest(user=r.user, prompt=r.prompt, steps=r.steps or 50,
                       partition=partition_key("replay", "ddim", OFF, r.steps or 50, r.width, r.height,
                                               r.cfg if r.cfg is not None else 7.5,
                                               cache_scope(r.user or f"no-user-{index}",
                                                           shared=not per_user)), seed=r.seed)
            for index, r in enumerate(trace)]


# The reuse rules a replay can run side by side (cachemgr.plan.ReuseRules): the live ones,
# the same without the seed cap (re-rolls keep too little of their variation, see
# DEFAULT_SEED_POLICY), and the old rules (seeds ignored, no lineage, no exact path).
RULES = {"new": ReuseRules(), "new-uncapped": ReuseRules(seed=SeedPolicy(SeedRule.NOISE_SWAP)),
         "old": OLD_RULES}


def row(result: SimResult, policy: str, budget: int, embedder: str, table: str,
        rules: str) -> dict:
    hits = max(result.hits, 1)
    resumes = max(sum(result.k_histogram.values()), 1)
    window = max(1, result.requests // 50)
    flags = np.array(result.hit_flags, dtype=float)
    return {
        "policy": policy, "budget_items": 5 * budget if budget else None,
        "budget_prompts": budget or None, "embedder": embedder, "k_table": table,
        "rules": rules, "requests": result.requests, "hit_rate": result.hits / result.requests,
        "steps_saved_frac": result.steps_saved / result.steps_requested,
        # [N, the step it ran from, requests]: what the step cache's compute figures
        # (bench.step_cost) start from
        "runs": [[n, start, count] for (n, start), count in sorted(result.runs.items())],
        "steps_saved_frac_by_kind": {kind: n / result.steps_requested
                                     for kind, n in sorted(result.steps_saved_by_kind.items())},
        "hits_by_kind": dict(sorted(result.hits_by_kind.items())),
        "mean_k_on_hit": sum(k * n for k, n in result.k_histogram.items()) / resumes,
        "k_histogram": {str(k): n for k, n in sorted(result.k_histogram.items())},
        "hits_same_user_frac_of_known": (result.hits_same_user
                                         / max(result.hits_same_user + result.hits_cross_user, 1)),
        "hits_user_unknown_frac": result.hits_user_unknown / hits,
        "steps_saved_same_user_frac": result.steps_saved_same_user / max(result.steps_saved, 1),
        "evictions": result.evictions, "max_items": result.max_items, "lookups": result.lookups,
        "hit_rate_window": window,
        "hit_rate_over_time": [float(flags[i:i + window].mean())
                               for i in range(0, len(flags) - window + 1, window)],
    }


def chroma_agreement(requests: list[SimRequest], embeddings: np.ndarray, rows: int = 5000,
                     queries: int = 300, seed: int = 0) -> dict:
    """Do the simulator's exact nearest entries (as many as triage weighs) agree with
    Chroma's (HNSW) on the same vectors? Compared by similarity, since exact repeats make
    ties between different entries."""
    from cachemgr.simulator import ExactIndex
    from cachemgr.vectors import VectorIndex

    rows = min(rows, len(requests))
    exact = ExactIndex(embeddings)
    by_partition: dict[str, list[int]] = {}
    for i in range(rows):
        exact.add(requests[i].partition, i)
        by_partition.setdefault(requests[i].partition, []).append(i)
    picks = np.random.default_rng(seed).choice(rows, size=min(queries, rows), replace=False)
    with tempfile.TemporaryDirectory() as tmp:
        index = VectorIndex.open(Path(tmp), "", "agreement")
        for partition, members in by_partition.items():
            index.add_many([str(i) for i in members], embeddings[members], partition, 0.0)
        agree = 0
        for i in picks:
            exact_found = exact.nearest(requests[i].partition, embeddings[i], LOOKUP_CANDIDATES)
            chroma_found = index.nearest(embeddings[i], requests[i].partition, LOOKUP_CANDIDATES)
            agree += len(exact_found) == len(chroma_found) and all(
                abs(a - b) <= 1e-4 for (_, a), (_, b) in zip(exact_found, chroma_found))
    return {"rows": rows, "queries": len(picks), "nearest": LOOKUP_CANDIDATES,
            "agreement": agree / len(picks)}


def similarity_profile(requests: list[SimRequest], embeddings: np.ndarray,
                       neighbours: Neighbours, table: KTable, embedder: str, out: Path) -> dict:
    from bench.plots import write_similarity_plot

    similarities = neighbours.top1()
    known = similarities[~np.isnan(similarities)]
    counts, edges = np.histogram(known, bins=20, range=(0.0, 1.0))
    thresholds = [threshold for threshold, _ in table.thresholds]
    write_similarity_plot(known.tolist(), thresholds, embedder, out)
    return {
        "embedder": embedder, "requests": len(requests),
        "first_of_partition": int(np.isnan(similarities).sum()),
        "percentiles": {str(q): float(np.percentile(known, q)) for q in (10, 25, 50, 75, 90)},
        "share_at_or_above": {str(t): float((known >= t).mean()) for t in thresholds},
        "histogram": {"edges": edges.round(2).tolist(), "counts": counts.tolist()},
        "exact_vs_chroma": chroma_agreement(requests, embeddings),
    }


def chroma_lookup_ms(embeddings: np.ndarray, queries: int = 300) -> float:
    """Query time of embedded Chroma holding these embeddings (one partition), asked for
    as many nearest entries as triage weighs."""
    from cachemgr.vectors import VectorIndex

    with tempfile.TemporaryDirectory() as tmp:
        index = VectorIndex.open(Path(tmp), "", "timing")
        index.add_many([str(i) for i in range(len(embeddings))], embeddings, "p", 0.0)
        started = time.perf_counter()
        for vector in embeddings[:queries]:
            index.nearest(vector, "p", LOOKUP_CANDIDATES)
        return 1e3 * (time.perf_counter() - started) / min(queries, len(embeddings))


def predictor_eval(requests, embeddings, neighbours, times, table, embedder, args) -> dict:
    config = PredictorConfig(min_samples=args.predictor_min_samples,
                             retrain_every=args.predictor_retrain_every, nu=args.predictor_nu,
                             audit_fraction=0.0)
    without = simulate(requests, embeddings, times,
                       SimConfig(policy_by_name("lcbfu"), table, admit_resumed=args.admit_resumed),
                       neighbours)
    with_predictor = simulate(requests, embeddings, times,
                              SimConfig(policy_by_name("lcbfu"), table, predictor=config,
                                        admit_resumed=args.admit_resumed),
                              neighbours)
    c = with_predictor.predictor_confusion
    scored = sum(c.values())
    hits_idx = [i for i, hit in enumerate(without.hit_flags) if hit]
    model = train_predictor(embeddings[hits_idx[-5000:]], "timing", nu=args.predictor_nu,
                            min_samples=1)
    assert model is not None  # min_samples=1: there is always a model
    started = time.perf_counter()
    for vector in embeddings[:300]:
        model.should_look_up(vector)
    predictor_ms = 1e3 * (time.perf_counter() - started) / min(300, len(embeddings))
    lookup_ms = chroma_lookup_ms(embeddings[: min(len(embeddings), 10_000)])
    skipped = (c["tn"] + c["fn"]) / max(scored, 1)
    return {
        "embedder": embedder, "k_table": table.name, "requests": len(requests),
        "scored_requests": scored, "confusion": dict(c),
        "precision": c["tp"] / max(c["tp"] + c["fp"], 1),
        "recall": c["tp"] / max(c["tp"] + c["fn"], 1),
        "lookups_skipped_frac": skipped,
        "chroma_lookup_ms": lookup_ms, "predictor_ms": predictor_ms,
        "lookup_ms_saved_per_request": skipped * lookup_ms - predictor_ms,
        "hit_rate_without": without.hits / without.requests,
        "hit_rate_with": with_predictor.hits / with_predictor.requests,
        "steps_saved_frac_without": without.steps_saved / without.steps_requested,
        "steps_saved_frac_with": with_predictor.steps_saved / with_predictor.steps_requested,
        "predictor": asdict(config),
    }


# What the sweep's worker processes read: set before the fork, so they share it unpickled.
_SWEEP: dict = {}


def _simulate_one(config: tuple[str, int, str]) -> SimResult:
    policy_name, budget, rules = config
    return simulate(_SWEEP["requests"], _SWEEP["embeddings"], _SWEEP["times"],
                    SimConfig(policy_by_name(policy_name), _SWEEP["table"], budget_prompts=budget,
                              keep_recent_s=_SWEEP["keep_recent_s"],
                              admit_resumed=_SWEEP["admit_resumed"], rules=RULES[rules]),
                    _SWEEP["neighbours"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default=str(DEFAULT_TRACE), help="trace CSV(.gz)")
    parser.add_argument("--limit", type=int, default=None, help="first N requests (after merge)")
    parser.add_argument("--channel", help="replay one channel instead of all interleaved")
    parser.add_argument("--seed", type=int, default=0, help="merge and arrival seed")
    parser.add_argument("--rate", type=float, default=1.0, help="Poisson arrivals per second")
    parser.add_argument("--policies", default="lcbfu",
                        help="comma-separated: lcbfu, lcbfu-decay<seconds>s, lru, lfu, fifo, none")
    parser.add_argument("--keep-recent-s", type=float, default=0.0,
                        help="spare the last item of prompts used this recently (all policies)")
    parser.add_argument("--admit-resumed", action=argparse.BooleanOptionalAction, default=True,
                        help="a resumed job keeps its latents above its K, as the live system "
                             "does by default (T2I_CACHE_ADMIT_RESUMED)")
    parser.add_argument("--budgets", default="0", help="comma-separated prompts; 0 = unbounded")
    parser.add_argument("--rules", default="new",
                        help="comma-separated reuse rules: new (the live ones: seeds honoured, "
                             "lineage capped, exact path), new-uncapped (the same but "
                             "another seed's latent serves any K), old (before them)")
    parser.add_argument("--embedder", default="minilm", help="minilm or clip")
    parser.add_argument("--k-table", default="reference", help="'reference' or a JSON path")
    parser.add_argument("--cache-scope", choices=["shared", "user"], default="shared",
                        help="one cache for everyone, or one per trace user (tenant isolation)")
    parser.add_argument("--predictor-eval", action="store_true",
                        help="evaluate the match predictor instead of sweeping policies")
    parser.add_argument("--similarity-profile", action="store_true",
                        help="report each request's top-1 similarity to earlier ones instead")
    parser.add_argument("--predictor-min-samples", type=int, default=200)
    parser.add_argument("--predictor-retrain-every", type=int, default=1000)
    parser.add_argument("--predictor-nu", type=float, default=0.1)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="configurations simulated in parallel (processes)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                        help="where prompt embeddings are cached between runs")
    parser.add_argument("--out", default="bench/results/replay", help="output path, no extension")
    args = parser.parse_args(argv)

    trace_path = Path(args.trace)
    trace = (list(read_trace(trace_path, limit=args.limit, channel=args.channel)) if args.channel
             else interleaved(trace_path, args.seed, args.limit))
    requests = sim_requests(trace, per_user=args.cache_scope == "user")
    cache_dir = Path(args.cache_dir).expanduser()
    embeddings = EmbeddingStore(cache_dir, args.embedder).matrix([r.prompt for r in requests])
    neighbours = neighbours_for(requests, embeddings, cache_dir / "neighbours")
    times = np.cumsum(np.random.default_rng(args.seed).exponential(1.0 / args.rate, len(requests)))
    table = KTable.load(args.k_table)
    command = "python -m bench.replay " + " ".join(sys.argv[1:] if argv is None else argv)
    result: dict = {"command": command, "machine": f"{platform.node()}: {platform.machine()}",
                    "trace": trace_path.name, "slice": args.channel or f"interleaved seed {args.seed}"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.similarity_profile:
        result["similarity_profile"] = similarity_profile(requests, embeddings, neighbours,
                                                          table, args.embedder, out)
        print(json.dumps(result["similarity_profile"]["share_at_or_above"], indent=2))
    elif args.predictor_eval:
        result["predictor_eval"] = predictor_eval(requests, embeddings, neighbours, times,
                                                  table, args.embedder, args)
        print(json.dumps(result["predictor_eval"], indent=2))
    else:
        configs = [(p, int(b), rules) for rules in args.rules.split(",")
                   for p in args.policies.split(",") for b in args.budgets.split(",")]
        _SWEEP.update(requests=requests, embeddings=embeddings, times=times, table=table,
                      neighbours=neighbours, keep_recent_s=args.keep_recent_s,
                      admit_resumed=args.admit_resumed)
        with multiprocessing.get_context("fork").Pool(max(1, args.jobs)) as pool:
            sims = list(tqdm(pool.imap(_simulate_one, configs), total=len(configs),
                             desc="simulating", unit="config"))
        rows = [row(sim, policy_name, budget, args.embedder, table.name, rules)
                | {"keep_recent_s": args.keep_recent_s, "cache_scope": args.cache_scope,
                   "admit_resumed": args.admit_resumed}
                for (policy_name, budget, rules), sim in zip(configs, sims)]
        result["rows"] = rows
        from bench.plots import markdown_table, write_sweep_plots

        out.with_suffix(".md").write_text(f"Command: `{command}`\n\n" + markdown_table(rows))
        write_sweep_plots(rows, out)
        for r in rows:
            print(f"{r['policy']:6} budget {r['budget_prompts'] or 'unbounded':>9} "
                  f"{r['rules']:8} hit rate {r['hit_rate']:.3f} steps saved "
                  f"{r['steps_saved_frac']:.3f} {r['steps_saved_frac_by_kind']}")
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    print(f"written {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

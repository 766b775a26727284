"""Quality under the step cache (core.stepcache), alone and stacked on resumes from K.

    python -m quality.step_cache

For -n scene-world pairs (a cached prompt A and a request B one edit, paraphrase or object
away from it, as quality.profile draws them) and --seeds seeds each, with each step cache of
--step-caches and without (off): A is generated (its latents kept after each K), B is
generated from scratch (K 0) and resumed from A's latent of the same seed at each K, all
with that step cache. Per (step cache, K), with 95% bootstrap intervals over pairs:

- adherence of B (the evaluator's reading against B's caption);
- re-roll diversity: the mean pairwise distance among B's images across seeds (evaluator
  features and pixels);
- each as a ratio to the same K without the step cache (what the step cache costs on top of
  the resume) and to B from scratch without it (what both cost together);
- UNet work per image: whole-UNet and shallow steps (core.stepcache's rule).

The pick: of the step caches whose every row keeps >= 95% of adherence and >= 90% of both
diversities of the same K without the step cache, at the intervals' lower ends, the one with
the fewest whole-UNet steps over the profiled Ks (else off).
Writes OUT.json and OUT.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from core.errors import SettingError
from core.jobs import JobRequest
from core.settings import load_settings
from core.stepcache import OFF, StepCache
from quality import evaluator as evaluation
from quality.evaluator import png_pixels
from quality.profile import Pair, scene_pairs
from quality.reroll import (
    ADHERENCE_TARGET,
    DIVERSITY_TARGET,
    keeps_target,
    quiet,
    ratio,
    resamples,
    seed_measures,
)
from quality.scenes import parse_caption
from workers.engine import Engine, Generation, Trajectory

KINDS = ("one-word edit", "paraphrase", "added or removed object")
MEASURES = ("adherence", "diversity_features", "diversity_pixels")


def run_together(engine: Engine, trajectories: list[Trajectory]) -> list[Generation]:
    """Advance the trajectories in one batch until all finish (as a batching worker does:
    each at its own step, each refreshing its deep features on its own schedule)."""
    while active := [t for t in trajectories if not t.finished]:
        engine.advance(active)
    return [engine.finish(t) for t in trajectories]


def generate(engine: Engine, pairs: list[Pair], seeds: int, ks: list[int], steps: int,
             guidance: float, size: int, label: str) -> dict[int, np.ndarray]:
    """B's images (pairs x seeds x H x W x 3) by K, 0 for from scratch."""
    images: dict[int, list[list[np.ndarray]]] = {k: [] for k in [0, *ks]}
    for pair in tqdm(pairs, desc=label, unit="pair"):
        def request(prompt: str, seed: int) -> JobRequest:
            return JobRequest(prompt, "", steps, guidance, seed, size, size)

        seeded = [pair.seed + s for s in range(seeds)]
        sources = run_together(engine, [engine.begin(request(pair.first, s), quiet,
                                                     frozenset(ks)) for s in seeded])
        wanted = [request(pair.second, s) for s in seeded]
        runs = [engine.begin(r, quiet) for r in wanted]
        runs += [engine.begin(r, quiet, frozenset(), source.captured[k], k)
                 for k in ks for r, source in zip(wanted, sources)]
        done = run_together(engine, runs)
        for index, k in enumerate([0, *ks]):
            images[k].append([png_pixels(g.image_png)
                              for g in done[index * seeds:(index + 1) * seeds]])
    return {k: np.array(rows) for k, rows in images.items()}


def keeps(ratios: dict[str, dict]) -> bool:
    """The target at the intervals' lower ends."""
    return keeps_target(ratios["adherence"], [ratios["diversity_features"],
                                              ratios["diversity_pixels"]], lower_bounds=True)


def pick(rows: list[dict]) -> str:
    """Of the step caches all of whose rows keep the target against the same K without
    it, at the lower ends, the one with the fewest whole-UNet steps; 'off' when none."""
    specs = [spec for spec in dict.fromkeys(r["step_cache"] for r in rows) if spec != OFF]
    passing = [spec for spec in specs
               if all(r["keeps_vs_same_k"] for r in rows if r["step_cache"] == spec)]
    return min(passing, key=lambda spec: sum(r["whole_unet_steps"] for r in rows
                                             if r["step_cache"] == spec), default=OFF)


def write_plot(rows: list[dict], title: str, path: Path) -> None:
    from bench.plots import write_ratio_panels  # matplotlib loads only when a plot is drawn

    specs = [spec for spec in dict.fromkeys(r["step_cache"] for r in rows) if spec != OFF]
    write_ratio_panels(
        {spec: [(r["k"], r["vs_same_k"]) for r in rows if r["step_cache"] == spec]
         for spec in specs},
        (("adherence", "adherence, over the same K without", ADHERENCE_TARGET),
         ("diversity_features", "re-roll diversity (features), over the same K without",
          DIVERSITY_TARGET),
         ("diversity_pixels", "re-roll diversity (pixels), over the same K without",
          DIVERSITY_TARGET)),
        "K the job resumed from (0: from scratch)", title, path)


def main(argv: list[str] | None = None) -> int:
    class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    parser.add_argument("-n", "--pairs", type=int, default=48, help="scene-world pairs")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per pair (>= 2)")
    parser.add_argument("--step-caches",
                        default="deepcache:2,deepcache:3,deepcache:3:0.2,deepcache:4:0.2,"
                                "deepcache:5:0.2,deepcache:8:0.2,deepcache:5:0.3",
                        help="T2I_STEP_CACHE values to profile (off is the baseline)")
    parser.add_argument("--ks", default="5,10,15,20", help="Ks B resumes from (of --steps)")
    parser.add_argument("--model", default="scene", help="a T2I_MODEL value")
    evaluation.add_scoring_options(parser)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    parser.add_argument("--out", default="bench/results/step-cache-profile-scene",
                        help="output path without suffix (.json and .png)")
    args = parser.parse_args(argv)

    try:
        caches = [StepCache(), *(StepCache.parse(s) for s in args.step_caches.split(",") if s != OFF)]
    except SettingError as exc:
        parser.error(f"--step-caches: {exc}")
    ks = sorted({int(k) for k in args.ks.split(",")})
    if not all(0 < k < args.steps for k in ks):
        parser.error(f"every K must lie in 1..{args.steps - 1}")
    if args.seeds < 2 or args.pairs < 2:
        parser.error("need at least 2 pairs and 2 seeds")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    judge = evaluation.load(Path(args.evaluator).expanduser())
    base = Engine.load(args.model, "ddim", "cpu", load_settings().state_path / "models", True)
    rng = random.Random(args.seed)
    pairs = [p for p in scene_pairs(rng, args.pairs * 5) if p.kind in KINDS][:args.pairs]
    asked = [parse_caption(p.second).attributes() for p in pairs]
    measured: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    for cache in caches:
        engine = Engine(base.pipe, "ddim", base.device, base.label, cache)
        images = generate(engine, pairs, args.seeds, ks, args.steps, args.guidance, args.size,
                          cache.spec)
        for k, array in images.items():
            measured[(cache.spec, k)] = seed_measures(judge, array, asked)[0]
    draws = resamples(len(pairs), args.bootstrap, args.seed)
    rows = []
    for cache, k in itertools.product(caches, [0, *ks]):
        mine, same_k, scratch = (measured[(cache.spec, k)], measured[(OFF, k)],
                                 measured[(OFF, 0)])
        row = {"step_cache": cache.spec, "k": k, "unet_steps": args.steps - k,
               "whole_unet_steps": cache.full_steps(k, args.steps),
               **{m: round(float(mine[m].mean()), 4) for m in MEASURES},
               "vs_same_k": {m: ratio(mine[m], same_k[m], draws) for m in MEASURES},
               "vs_scratch": {m: ratio(mine[m], scratch[m], draws) for m in MEASURES}}
        row["keeps_vs_same_k"] = keeps(row["vs_same_k"])
        row["keeps_vs_scratch"] = keeps(row["vs_scratch"])
        rows.append(row)
    command = " ".join(["python -m quality.step_cache", *(sys.argv[1:] if argv is None else argv)])
    report = {
        "command": command, "model": base.label, "scheduler": "ddim", "pairs": len(pairs),
        "kinds": {kind: sum(p.kind == kind for p in pairs) for kind in KINDS},
        "seeds": args.seeds, "steps": args.steps, "guidance": args.guidance, "size": args.size,
        "step_caches": [cache.spec for cache in caches], "ks": ks, "bootstrap_resamples": args.bootstrap,
        "target": {"adherence_ratio_min": ADHERENCE_TARGET,
                   "diversity_ratio_min": DIVERSITY_TARGET,
                   "applied_to": "95% interval lower ends, against the same K without the "
                                 "step cache, every K"},
        "rows": rows, "pick": pick(rows), "seconds": round(time.monotonic() - started, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    write_plot(rows, f"{base.label}, ddim, {args.steps} steps: {len(pairs)} pairs x "
               f"{args.seeds} seeds; ratios to the same K without the step cache",
               out.with_suffix(".png"))
    print(f"{'cache':16s} {'K':>3s} {'whole':>5s} " + " ".join(f"{m:>24s}" for m in MEASURES))
    for row in rows:
        cells = " ".join(f"{c['value']:.3f} [{c['ci95'][0]:.3f},{c['ci95'][1]:.3f}]".rjust(24)
                         for c in (row["vs_scratch"][m] for m in MEASURES))
        print(f"{row['step_cache']:16s} {row['k']:3d} {row['whole_unet_steps']:5d} {cells}"
              + (" *" if row["keeps_vs_same_k"] else ""))
    print(f"pick: {report['pick']}; {report['seconds']:.0f} s -> {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Re-roll diversity of resumed generations: does a cache hit whose seed differs from the
cached generation's (a "re-roll": same prompt, new seed) still give a new picture?

    python -m quality.reroll

DDIM is deterministic once the latent at step K is fixed, so resuming a re-roll as is
returns the cached picture. For -n held-out scene prompts this generates a source with
seed s0 (keeping its latents after every --ks K) and --rerolls seeds s1..sR from scratch,
then resumes each re-roll seed from the source's latent at each K under each seed rule:
plain resume (today's; K_CAP's profile), NOISE_SWAP, RENOISE back to a fraction of K
(--renoise), STOCHASTIC_TAIL. Per (rule, K) it reports, each with a 95% bootstrap interval
over prompts:

- re-roll diversity ratio: the mean pairwise distance among a prompt's re-rolls (on the
  evaluator's features, and on pixels), resumed over from scratch;
- adherence ratio: evaluator-read prompt adherence, resumed over from scratch (same
  prompts and seeds);
- distance-to-source ratio: how far re-rolls move from the source picture, resumed over
  from scratch;
- steps saved: the step the job runs from, over N.

The target: keep >= 90% of from-scratch diversity (both measures) at >= 95% of its
adherence. The recommendation is the (rule, K) meeting it that saves the most steps; K_CAP's
cap is the largest K at which plain resume meets it. Writes OUT.json and OUT.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from core.jobs import JobRequest
from core.plan import Reseed, SeedRule
from core.settings import load_settings
from quality import evaluator as evaluation
from quality.evaluator import png_pixels
from quality.scenes import adherence, caption, sample_scene
from workers.engine import Engine

DIVERSITY_TARGET, ADHERENCE_TARGET = 0.90, 0.95
# Each measure per prompt -> the name of its resumed / from-scratch ratio in the report.
RATIOS = {"diversity_features": "diversity_ratio_features",
          "diversity_pixels": "diversity_ratio_pixels", "adherence": "adherence_ratio",
          "to_source_features": "to_source_ratio_features",
          "to_source_pixels": "to_source_ratio_pixels"}


@dataclass(frozen=True)
class Variant:
    """A way to resume a re-roll: a seed rule (None: plain resume) and, for RENOISE, the
    fraction of K it runs from."""

    name: str
    rule: SeedRule | None
    run_from_fraction: float = 1.0

    def run_from(self, k: int) -> int:
        return int(k * self.run_from_fraction)


def variants(renoise_fractions: list[float]) -> list[Variant]:
    return [Variant("plain resume", None), Variant("noise swap", SeedRule.NOISE_SWAP),
            *(Variant(f"re-noise to {f:g}K", SeedRule.RENOISE, f) for f in renoise_fractions),
            Variant("stochastic tail", SeedRule.STOCHASTIC_TAIL)]


def quiet(done: int, total: int) -> None:
    return None


def generate_images(engine: Engine, prompts: list[str], rerolls: int, ks: list[int],
                    kinds: list[Variant], steps: int, guidance: float, size: int, seed: int,
                    progress: bool = True) -> dict[str, np.ndarray]:
    """Images (uint8, prompts x seeds x H x W x 3): 'source' (one seed), 'scratch', and one
    array per (variant, K) keyed 'name@K'."""
    images: dict[str, list[list[np.ndarray]]] = {"source": [], "scratch": []}
    for prompt_index, prompt in enumerate(tqdm(prompts, desc="re-rolling prompts", unit="prompt",
                                               disable=not progress)):
        source_seed = seed + 1000 * prompt_index
        requests = [JobRequest(prompt, "", steps, guidance, source_seed + r, size, size)
                    for r in range(rerolls + 1)]  # the source's, then the re-rolls'
        source = engine.generate(requests[0], quiet, frozenset(ks))
        images["source"].append([png_pixels(source.image_png)])
        images["scratch"].append([png_pixels(engine.generate(r, quiet).image_png)
                                  for r in requests[1:]])
        for kind, k in itertools.product(kinds, ks):
            latent = source.captured[k]
            if kind.rule is None:  # plain resume ignores the job's seed: run once, as every seed
                row = [png_pixels(engine.resume(requests[1], latent, k, quiet).image_png)] * rerolls
            else:
                reseed = Reseed(kind.rule, source_seed, kind.run_from(k))
                row = [png_pixels(engine.resume(r, latent, k, quiet, reseed=reseed).image_png)
                       for r in requests[1:]]
            images.setdefault(f"{kind.name}@{k}", []).append(row)
    return {key: np.array(rows) for key, rows in images.items()}


def mean_pairwise(values: np.ndarray,
                  distance: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Per prompt (axis 0), the mean distance over pairs of its items (axis 1)."""
    pairs = list(itertools.combinations(range(values.shape[1]), 2))
    return np.mean([distance(values[:, i], values[:, j]) for i, j in pairs], axis=0)


def feature_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=-1)


def pixel_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute difference in [0, 1] over pixels and channels."""
    return np.abs(a.astype(np.float32) - b.astype(np.float32)).mean(axis=(-3, -2, -1)) / 255.0


def seed_adherence(found: list[frozenset[str]], asked: list[frozenset[str]],
                   seeds: int) -> np.ndarray:
    """Per prompt, the adherence of what the evaluator ``found`` in its ``seeds`` images
    (prompt-major, as images of prompts x seeds flatten) to its ``asked`` attributes, mean
    over its seeds."""
    scores = np.array([adherence(asked[i // seeds], seen) for i, seen in enumerate(found)])
    return scores.reshape(-1, seeds).mean(1)


def seed_reads(judge: evaluation.Evaluator, images: np.ndarray) -> list[frozenset[str]]:
    """What the evaluator finds in each image of ``images`` (prompts x seeds x H x W x 3),
    prompt-major."""
    return judge.read(evaluation.to_tensor(images.reshape(-1, *images.shape[2:])))


def seed_measures(judge: evaluation.Evaluator, images: np.ndarray, asked: list[frozenset[str]]
                  ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per prompt of ``images`` (prompts x seeds x H x W x 3): re-roll diversity (mean
    pairwise distance, evaluator features and pixels) and adherence (mean over its seeds);
    and the evaluator's features (prompts x seeds x d)."""
    prompts, seeds = images.shape[:2]
    flat = evaluation.to_tensor(images.reshape(-1, *images.shape[2:]))
    features = judge.embed(flat).numpy().reshape(prompts, seeds, -1)
    return {"diversity_features": mean_pairwise(features, feature_distance),
            "diversity_pixels": mean_pairwise(images, pixel_distance),
            "adherence": seed_adherence(judge.read(flat), asked, seeds)}, features


def per_prompt(judge: evaluation.Evaluator, images: np.ndarray, source: np.ndarray,
               asked: list[frozenset[str]]) -> dict[str, np.ndarray]:
    """Each measure per prompt for one set of re-rolls (prompts x seeds x H x W x 3)."""
    measures, features = seed_measures(judge, images, asked)
    source_features = judge.embed(evaluation.to_tensor(source[:, 0])).numpy()
    return {
        **measures,
        "to_source_features": feature_distance(features, source_features[:, None]).mean(1),
        "to_source_pixels": pixel_distance(images, source[:, :1]).mean(1),
    }


def resamples(count: int, draws: int = 2000, seed: int = 0) -> np.ndarray:
    """Bootstrap resamples (rows of indices) over ``count`` paired units, for ``ratio``."""
    return np.random.default_rng(seed).integers(0, count, size=(draws, count))


def ratio(resumed: np.ndarray, scratch: np.ndarray, resamples: np.ndarray) -> dict[str, object]:
    """Mean over prompts resumed / from scratch, with a 95% bootstrap interval (prompts
    resampled, the same resamples for every ratio). Undefined (None) when from scratch
    scores 0; resamples that do are left out of the interval."""
    if not scratch.mean() > 0:
        return {"value": None, "ci95": None}
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = resumed[resamples].mean(1) / scratch[resamples].mean(1)
    low, high = np.percentile(boot[np.isfinite(boot)], [2.5, 97.5])
    return {"value": round(float(resumed.mean() / scratch.mean()), 4),
            "ci95": [round(float(low), 4), round(float(high), 4)]}


def keeps_target(adherence_ratio: dict, diversity_ratios: list[dict],
                 lower_bounds: bool) -> bool:
    """>= ADHERENCE_TARGET of adherence and >= DIVERSITY_TARGET of every diversity measure,
    on point estimates or on the intervals' lower ends (an undefined ratio meets nothing)."""
    def pick(cell: dict) -> float:
        value = (cell["ci95"] or [None])[0] if lower_bounds else cell["value"]
        return float("-inf") if value is None else value
    return (all(pick(cell) >= DIVERSITY_TARGET for cell in diversity_ratios)
            and pick(adherence_ratio) >= ADHERENCE_TARGET)


def meets(row: dict, lower_bounds: bool = False) -> bool:
    """The target on a re-roll profile row."""
    return keeps_target(row["adherence_ratio"], [row["diversity_ratio_features"],
                                                 row["diversity_ratio_pixels"]], lower_bounds)


def recommend(rows: list[dict], steps: int) -> dict[str, object]:
    """The row meeting the target that saves the most steps (ties: more diversity), with
    K and the step it runs from also on a 50-step grid; the K_CAP cap and each rule's
    largest K meeting the target."""
    def largest_k(name: str) -> int | None:
        return max((r["k"] for r in rows if r["rule"] == name and r["meets_target"]), default=None)

    rules = list(dict.fromkeys(r["rule"] for r in rows))
    by_rule = {name: largest_k(name) for name in rules}
    passing = [r for r in rows if r["meets_target"]]
    out: dict[str, object] = {"largest_k_meeting_target": by_rule,
                              "k_cap": by_rule["plain resume"]}
    if not passing:
        return {"rule": None, **out}
    best = max(passing, key=lambda r: (r["run_from"], r["diversity_ratio_features"]["value"]))
    return {"rule": best["rule"], "seed_rule": best["seed_rule"], "k": best["k"],
            "run_from": best["run_from"], "k_of_50": round(best["k"] * 50 / steps),
            "run_from_of_50": round(best["run_from"] * 50 / steps),
            "steps_saved_frac": best["steps_saved_frac"],
            "meets_target_at_ci_lower_bounds": meets(best, lower_bounds=True), **out}


def write_plot(rows: list[dict], title: str, path: Path) -> None:
    from bench.plots import write_ratio_panels  # matplotlib loads only when a plot is drawn

    rules = dict.fromkeys(r["rule"] for r in rows)
    write_ratio_panels(
        {rule: [(r["k"], r) for r in rows if r["rule"] == rule] for rule in rules},
        (("diversity_ratio_features", "diversity ratio (evaluator features)", DIVERSITY_TARGET),
         ("diversity_ratio_pixels", "diversity ratio (pixels)", DIVERSITY_TARGET),
         ("adherence_ratio", "adherence ratio", ADHERENCE_TARGET)),
        "K: steps the cached latent had run", title, path)


def main(argv: list[str] | None = None) -> int:
    class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    parser.add_argument("-n", "--prompts", type=int, default=24, help="held-out scene prompts")
    parser.add_argument("--rerolls", type=int, default=4, help="re-roll seeds per prompt (>= 2)")
    parser.add_argument("--ks", default="1,2,3,5,10,15,20",
                        help="K values: steps the cached latent had run (of --steps)")
    parser.add_argument("--renoise", default="0.5,0.75",
                        help="RENOISE variants: the fractions of K they run from")
    parser.add_argument("--model", default="scene", help="a T2I_MODEL value (default: the "
                        "committed scene model)")
    parser.add_argument("--scheduler", default="ddim", choices=["ddim", "euler"])
    evaluation.add_scoring_options(parser)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default); the scene model is so small "
                             "that more threads barely help, and they stall on a busy machine")
    parser.add_argument("--out", default="bench/results/reroll-diversity-scene",
                        help="output path without suffix (.json and .png)")
    args = parser.parse_args(argv)

    ks = sorted({int(k) for k in args.ks.split(",")})
    if not all(0 < k < args.steps for k in ks):
        parser.error(f"--ks {ks}: every K must lie in 1..{args.steps - 1}")
    fractions = [float(f) for f in args.renoise.split(",") if f]
    if not all(0 <= f < 1 for f in fractions):
        parser.error("--renoise fractions must lie in [0, 1)")
    if args.rerolls < 2 or args.prompts < 2:
        parser.error("need at least 2 prompts and 2 re-rolls")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    judge = evaluation.load(Path(args.evaluator).expanduser())
    engine = Engine.load(args.model, args.scheduler, "cpu", load_settings().state_path / "models",
                         True)
    rng = random.Random(args.seed)
    scenes = [sample_scene(rng) for _ in range(args.prompts)]
    prompts = [caption(scene, rng) for scene in scenes]
    kinds = variants(fractions)
    images = generate_images(engine, prompts, args.rerolls, ks, kinds, args.steps, args.guidance,
                             args.size, args.seed)

    asked = [scene.attributes() for scene in scenes]
    source = images["source"]
    scratch = per_prompt(judge, images["scratch"], source, asked)
    draws = resamples(args.prompts, args.bootstrap, args.seed)
    rows = []
    for kind, k in itertools.product(kinds, ks):
        resumed = per_prompt(judge, images[f"{kind.name}@{k}"], source, asked)
        row = {"rule": kind.name, "seed_rule": str(kind.rule) if kind.rule else None, "k": k,
               "run_from": kind.run_from(k),
               "steps_saved_frac": round(kind.run_from(k) / args.steps, 4),
               **{name: ratio(resumed[m], scratch[m], draws) for m, name in RATIOS.items()},
               "adherence": round(float(resumed["adherence"].mean()), 4)}
        row["meets_target"] = meets(row)
        rows.append(row)

    command = " ".join(["python -m quality.reroll", *(sys.argv[1:] if argv is None else argv)])
    report = {
        "command": command, "model": engine.label, "scheduler": args.scheduler,
        "evaluator": args.evaluator, "prompts": args.prompts, "rerolls_per_prompt": args.rerolls,
        "steps": args.steps, "guidance": args.guidance, "size": args.size, "ks": ks,
        "bootstrap_resamples": args.bootstrap, "seed": args.seed,
        "target": {"diversity_ratio_min": DIVERSITY_TARGET, "adherence_ratio_min": ADHERENCE_TARGET,
                   "applied_to": "point estimates; both diversity measures"},
        "from_scratch": {m: round(float(v.mean()), 4) for m, v in scratch.items()},
        "rows": rows,
        "recommendation": recommend(rows, args.steps),
        "seconds": round(time.monotonic() - started, 1),
        "example_prompts": prompts[:4],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    write_plot(rows, f"{engine.label}, {args.scheduler}, {args.steps} steps, guidance "
               f"{args.guidance:g}: {args.prompts} prompts x {args.rerolls} re-rolls",
               out.with_suffix(".png"))
    print(f"{'rule':22s} {'K':>3s} {'from':>4s} {'div feat':>18s} {'div pix':>18s} "
          f"{'adherence':>18s}")
    for row in rows:
        cells = " ".join(f"{row[key]['value']:.2f} [{row[key]['ci95'][0]:.2f},{row[key]['ci95'][1]:.2f}]"
                         .rjust(18) for key in ("diversity_ratio_features", "diversity_ratio_pixels",
                                                "adherence_ratio"))
        print(f"{row['rule']:22s} {row['k']:3d} {row['run_from']:4d} {cells}"
              + (" *" if row["meets_target"] else ""))
    print("recommendation:", json.dumps(report["recommendation"]))
    print(f"{report['seconds']:.0f} s -> {out.with_suffix('.json')}, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

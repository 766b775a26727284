"""Profile what resuming from another prompt's latent costs in image quality, for one or more
triage embedders on the same prompt pairs, and derive each one's similarity -> K table.

    python -m quality.profile --model quality/weights/scene-sd --scorer scene \\
        --embedders minilm,clip --pairs-per-bin 64 --out bench/results/k-profile-scene

Prompt pairs (A, B) come in the kinds real traffic has (scene-world pairs by default:
one-word edits, re-rolls with another seed, paraphrases, added or removed objects,
unrelated scenes; or neighbouring lines of any --prompts file). Pairs are kept until every
embedder has --pairs-per-bin pairs in each of its similarity bins (or the candidates run
out). For each pair: generate A, keeping its latents after each profiled K; generate B
from scratch (with A's seed unless B is a re-roll); and resume B from A's latent at every
K as a cache hit would (a re-roll's seed through the served seed rule). The measurements do
not depend on the embedder; only the binning does, so the embedders are compared on
exactly the same images.

Per embedder, a cell's ratio is B's mean score resumed at K over its mean score from
scratch, with a 95% bootstrap interval over the cell's pairs. The table is derived from the
intervals' lower ends (``derive_table``), so a bin gets a K only where the data says it is
safe. How well an embedder's similarity tells safe reuse from unsafe is the AUC, per K, of
similarity against "this pair keeps --tolerance of its from-scratch score at K". Writes
OUT.json, a heat map per embedder (OUT-EMBEDDER.png) and a table per embedder
(OUT-table-EMBEDDER.json, for T2I_K_TABLE). Any model directory and scorer work (see
quality.scoring); a table is only valid for the embedder and model it was profiled with.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cachemgr.ktable import KTable, derive_table
from cachemgr.plan import DEFAULT_SEED_POLICY
from core.jobs import JobRequest
from core.plan import Reseed
from core.settings import load_settings
from quality.evaluator import png_pixels
from quality.reroll import ratio
from quality.scenes import caption, edit, sample_scene
from quality.scoring import Scorer, load_scorer
from workers.embedder import load_embedder
from workers.engine import Engine

DEFAULT_EDGES = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99)
SCENE_KINDS = ("one-word edit", "re-roll", "paraphrase", "added or removed object",
               "unrelated")


@dataclass(frozen=True)
class Pair:
    """A cached prompt A and a new request B that could resume from A's latent."""
    kind: str
    first: str
    second: str
    seed: int
    second_seed: int


def scene_pairs(rng: random.Random, count: int) -> list[Pair]:
    """``count`` scene-world pairs, the kinds in turn. An edit, an added or a removed object
    keeps the rest of the caption's phrasing (the same wording choices), as a user's edit
    does."""
    pairs = []
    for index in range(count):
        kind = SCENE_KINDS[index % len(SCENE_KINDS)]
        scene, phrasing, seed = sample_scene(rng), rng.getrandbits(32), rng.randrange(2 ** 31)
        if kind == "added or removed object":
            while len(scene.objects) < 2:
                scene = sample_scene(rng)
            text = caption(scene, random.Random(phrasing))
            other = caption(scene, random.Random(phrasing), omit=rng.randrange(2))
            if rng.random() < 0.5:
                text, other = other, text  # added rather than removed
        else:
            text = caption(scene, random.Random(phrasing))
        if kind == "one-word edit":
            other = caption(edit(scene, rng), random.Random(phrasing))
        elif kind == "re-roll":
            other = text
        elif kind == "paraphrase":
            other = caption(scene, rng)
        elif kind == "unrelated":
            other = caption(sample_scene(rng), rng)
        pairs.append(Pair(kind, text, other, seed, seed + 1 if kind == "re-roll" else seed))
    return pairs


def nearby_pairs(prompts: list[str], rng: random.Random, count: int) -> list[Pair]:
    """Pairs from a prompt list in arrival order: mostly a prompt and one of the next few
    (users' edits sit close together in a trace), some at random."""
    pairs = []
    for _ in range(count):
        first, seed = rng.randrange(len(prompts) - 1), rng.randrange(2 ** 31)
        if rng.random() < 0.8:
            second, kind = min(first + rng.randint(1, 8), len(prompts) - 1), "trace neighbour"
        else:
            second, kind = rng.randrange(len(prompts)), "trace random"
        pairs.append(Pair(kind, prompts[first], prompts[second], seed, seed))
    return pairs


def bin_of(similarity: float, edges: tuple[float, ...]) -> int | None:
    """The index of the bin [edge, next edge) holding ``similarity`` (the last reaches 1)."""
    found = None
    for index, edge in enumerate(edges):
        if similarity >= edge:
            found = index
    return found


def select(similarities: dict[str, np.ndarray], edges: tuple[float, ...],
           per_bin: int) -> list[int]:
    """Indices of the candidates to measure: a candidate is kept while any embedder's bin
    for it holds fewer than ``per_bin``; so every embedder gets up to ``per_bin`` per bin
    from one shared set of pairs."""
    counts = {name: Counter[int]() for name in similarities}
    kept = []
    for index in range(len(next(iter(similarities.values())))):
        bins = {name: bin_of(float(values[index]), edges)
                for name, values in similarities.items()}
        if any(b is not None and counts[name][b] < per_bin for name, b in bins.items()):
            kept.append(index)
            for name, b in bins.items():
                if b is not None:
                    counts[name][b] += 1
    return kept


def measure(engine: Engine, scorer: Scorer, pairs: list[Pair], steps: int, ks: list[int],
            guidance: float, size: int, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """B's score from scratch (one per pair) and resumed from A's latent at each K (pairs x
    Ks)."""
    def request(prompt: str, seed: int) -> JobRequest:
        return JobRequest(prompt, "", steps, guidance, seed, size, size)

    def quiet(done: int, total: int) -> None:
        return None

    scratch, resumed = [], []
    for pair in tqdm(pairs, desc="profiling pairs", unit="pair", disable=not progress):
        source = engine.generate(request(pair.first, pair.seed), quiet, frozenset(ks))
        wanted = request(pair.second, pair.second_seed)
        scratch.append(png_pixels(engine.generate(wanted, quiet).image_png))
        for k in ks:
            reseed = (None if pair.second_seed == pair.seed
                      else Reseed(DEFAULT_SEED_POLICY.rule, pair.seed, k))
            resumed.append(png_pixels(engine.resume(wanted, source.captured[k], k, quiet,
                                                    reseed=reseed).image_png))
    prompts = [pair.second for pair in pairs]
    scratch_scores = scorer.score(prompts, np.stack(scratch))
    resumed_scores = scorer.score([p for p in prompts for _ in ks], np.stack(resumed))
    return scratch_scores, resumed_scores.reshape(len(pairs), len(ks))


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """The probability that a random positive outscores a random negative (ties half):
    how well ``scores`` separate ``labels``; None when one class is empty."""
    positives, negatives = scores[labels], scores[~labels]
    if not len(positives) or not len(negatives):
        return None
    wins = (positives[:, None] > negatives[None, :]).mean()
    ties = (positives[:, None] == negatives[None, :]).mean()
    return float(wins + ties / 2)


def profile_embedder(similarity: np.ndarray, kinds: list[str], scratch: np.ndarray,
                     resumed: np.ndarray, edges: tuple[float, ...], ks: list[int],
                     tolerance: float, resamples: int, seed: int) -> dict:
    """One embedder's bins (pairs, kinds, ratio and interval per K) and its AUC per K."""
    rng = np.random.default_rng(seed)
    bins = []
    where = np.array([-1 if (b := bin_of(float(s), edges)) is None else b for s in similarity])
    for index, low in enumerate(edges):
        members = np.flatnonzero(where == index)
        if not len(members):
            continue
        draws = rng.integers(0, len(members), (resamples, len(members)))
        bins.append({
            "similarity_low": low,
            "similarity_high": edges[index + 1] if index + 1 < len(edges) else 1.0,
            "pairs": int(len(members)),
            "kinds": dict(Counter(kinds[i] for i in members).most_common()),
            "mean_similarity": float(similarity[members].mean()),
            "scratch_score": float(scratch[members].mean()),
            "ratio": {k: ratio(resumed[members, column], scratch[members], draws)
                      for column, k in enumerate(ks)}})
    safe = resumed >= tolerance * scratch[:, None]
    return {"bins": bins,
            "auc_safe_vs_similarity": {k: auc(similarity, safe[:, column])
                                       for column, k in enumerate(ks)},
            "safe_fraction": {k: float(safe[:, column].mean()) for column, k in enumerate(ks)}}


def lower_bounds(bins: list[dict]) -> dict[float, dict[int, float]]:
    """Each cell's 95% interval's lower end (0 where the ratio is undefined)."""
    return {row["similarity_low"]: {k: (cell["ci95"] or [0.0])[0]
                                    for k, cell in row["ratio"].items()} for row in bins}


def write_heatmap(bins: list[dict], ks: list[int], steps: int, tolerance: float,
                  title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(reversed(bins))  # most similar on top
    cells = [[row["ratio"][k] for k in ks] for row in rows]
    grid = np.array([[cell["value"] or 0.0 for cell in line] for line in cells])
    figure, axis = plt.subplots(figsize=(1.6 + 1.0 * len(ks), 1.4 + 0.55 * len(rows)))
    image = axis.imshow(grid, cmap="RdYlGn", vmin=0.5, vmax=1.1, aspect="auto")
    for (row, column), cell in np.ndenumerate(np.array(cells, dtype=object)):
        low, high = cell["ci95"] or (0.0, 0.0)
        axis.text(column, row, f"{cell['value'] or 0:.2f}\n[{low:.2f},{high:.2f}]",
                  ha="center", va="center", fontsize=6.5,
                  fontweight="bold" if low >= tolerance else "normal")
    axis.set_xticks(range(len(ks)), [str(k) for k in ks])
    axis.set_yticks(range(len(rows)), [f"{row['similarity_low']:.2f}-"
                                       f"{row['similarity_high']:.2f} (n={row['pairs']})"
                                       for row in rows])
    axis.set_xlabel(f"K: steps taken from the cached latent (of {steps}); "
                    f"bold: 95% interval above {tolerance:g}")
    axis.set_ylabel("prompt similarity")
    axis.set_title(title, fontsize=9)
    figure.colorbar(image, label="score resumed / from scratch")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a diffusers model directory (or 'tiny')")
    parser.add_argument("--scorer", default="scene",
                        help="'scene' (evaluator adherence; 'scene:WEIGHTS' for other weights) "
                             "or 'clip:PATH' (CLIPScore with a local CLIP model)")
    parser.add_argument("--embedders", default="minilm",
                        help="comma-separated triage embedders to profile on the same pairs "
                             "(minilm, clip: the model's own text encoder)")
    parser.add_argument("--prompts", default="",
                        help="a file of prompts, one per line, in arrival order (default: "
                             "scene-world prompt pairs)")
    parser.add_argument("--candidates", type=int, default=20000,
                        help="candidate pairs drawn before binning")
    parser.add_argument("--pairs-per-bin", type=int, default=64,
                        help="pairs wanted in every similarity bin of every embedder")
    parser.add_argument("--edges", default=",".join(map(str, DEFAULT_EDGES)),
                        help="lower similarity edges of the bins")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    parser.add_argument("--ks", default="",
                        help="K values to profile (default: 10%%..80%% of --steps)")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--tolerance", type=float, default=0.95,
                        help="keep this fraction of the from-scratch score")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/k-profile",
                        help="output path without suffix (OUT.json, OUT-EMBEDDER.png, "
                             "OUT-table-EMBEDDER.json)")
    args = parser.parse_args(argv)

    ks = ([int(k) for k in args.ks.split(",")] if args.ks
          else sorted({max(1, round(args.steps * f / 10)) for f in range(1, 9)}))
    if not all(0 < k < args.steps for k in ks):
        parser.error(f"--ks {ks}: every K must lie in 1..{args.steps - 1}")
    edges = tuple(sorted(float(edge) for edge in args.edges.split(",")))
    rng = random.Random(args.seed)
    if args.prompts:
        lines = [line.strip() for line in Path(args.prompts).read_text().splitlines()]
        candidates = nearby_pairs([line for line in lines if line], rng, args.candidates)
    else:
        candidates = scene_pairs(rng, args.candidates)
    model = args.model if args.model == "tiny" else str(Path(args.model).expanduser())
    models_dir = load_settings().state_path / "models"  # where 'tiny' is built
    engine = Engine.load(model, "ddim", "cpu", models_dir, True)
    scorer = load_scorer(args.scorer)
    similarities: dict[str, np.ndarray] = {}
    names: dict[str, str] = {}
    texts = sorted({text for pair in candidates for text in (pair.first, pair.second)})
    for spec in args.embedders.split(","):
        embedder = load_embedder(spec, model, models_dir)
        vectors = dict(zip(texts, embedder.embed(texts)))
        similarities[spec] = np.array([float(vectors[p.first] @ vectors[p.second])
                                       for p in candidates])
        names[spec] = embedder.name
    kept = select(similarities, edges, args.pairs_per_bin)
    pairs = [candidates[i] for i in kept]
    scratch, resumed = measure(engine, scorer, pairs, args.steps, ks, args.guidance, args.size)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "command": "python -m quality.profile " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": engine.label, "scorer": scorer.name, "steps": args.steps, "ks": ks,
        "guidance": args.guidance, "tolerance": args.tolerance, "candidates": len(candidates),
        "pairs_measured": len(pairs), "bootstrap_resamples": args.bootstrap,
        "pair_kinds": dict(Counter(pair.kind for pair in pairs).most_common()),
        "embedders": {}}
    failed = False
    for spec, similarity in similarities.items():
        result = profile_embedder(similarity[kept], [p.kind for p in pairs], scratch, resumed,
                                  edges, ks, args.tolerance, args.bootstrap, args.seed)
        result["name"] = names[spec]
        short = [row["pairs"] for row in result["bins"] if row["pairs"] < args.pairs_per_bin]
        result["bins_short_of_pairs"] = short
        write_heatmap(result["bins"], ks, args.steps, args.tolerance,
                      f"{engine.label}, {scorer.name}, {names[spec]} (95% bootstrap intervals)",
                      out.with_name(f"{out.name}-{spec}.png"))
        try:
            table: KTable | None = derive_table(
                f"profiled-{names[spec]}-{scorer.name}-{args.tolerance:g}", args.steps,
                lower_bounds(result["bins"]), args.tolerance)
        except ValueError as exc:
            print(f"error: {spec}: {exc}", file=sys.stderr)
            table, failed = None, True
        result["table"] = json.loads(table.to_json()) if table else None
        report["embedders"][spec] = result
        for row in reversed(result["bins"]):
            print(f"{spec} {row['similarity_low']:.2f}-{row['similarity_high']:.2f} "
                  f"n={row['pairs']:3d} " + " ".join(
                      f"K{k}:{cell['value'] or 0:.2f}" for k, cell in row["ratio"].items()))
        print(f"{spec} AUC per K: " + " ".join(
            f"K{k}:{value:.2f}" if value is not None else f"K{k}:-"
            for k, value in result["auc_safe_vs_similarity"].items()))
        if table:
            path = out.with_name(f"{out.name}-table-{spec}.json")
            path.write_text(table.to_json() + "\n")
            print(f"{spec} table (K of {args.steps}): {list(table.thresholds)} -> {path}")
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

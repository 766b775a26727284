"""Profile what resuming from another prompt's latent costs in image quality, and derive the
similarity -> K table the triage uses from it.

    python -m quality.profile --model ~/.cache/t2i/models/scene-sd/model --scorer scene \\
        --table-out bench/results/k-table-scene.json

Prompt pairs (A, B) are drawn across the triage embedder's similarity range (scene-world
variants by default, or neighbouring lines of any --prompts file) and kept up to --pairs-per-bin
per similarity bin. For each pair: generate A, keeping its latents after each profiled K;
generate B from scratch with A's seed; and resume B from A's latent at every K, as a cache
hit would. A cell's ratio is B's mean score resumed at K over its mean score from scratch
(same seed, so an identical prompt gives exactly 1). From a
--tolerance (keep 95% by default) the command derives the table (``derive_table``) and
writes it where T2I_K_TABLE can point. Any model directory and scorer work (see
quality.scoring); a table is only valid for the embedder and model it was profiled with.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cachemgr.ktable import derive_table
from core.jobs import JobRequest
from core.settings import load_settings
from quality.evaluator import png_pixels
from quality.scenes import caption, edit, sample_scene
from quality.scoring import Scorer, load_scorer
from workers.embedder import Embedder, load_embedder
from workers.engine import Engine

DEFAULT_EDGES = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99)


@dataclass
class Cell:
    """One similarity bin: the pairs in it and their scores."""
    low: float
    high: float
    pairs: list[tuple[str, str, float]] = field(default_factory=list)
    scratch: list[float] = field(default_factory=list)
    resumed: dict[int, list[float]] = field(default_factory=dict)

    def ratios(self) -> dict[int, float]:
        base = float(np.mean(self.scratch))
        return {k: float(np.mean(scores)) / base if base else 0.0
                for k, scores in sorted(self.resumed.items())}


def scene_pairs(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """Scene-world pairs from identical prompts through paraphrases and 1-3 edits to
    unrelated scenes, so every similarity bin gets candidates."""
    pairs = []
    for _ in range(count):
        first = sample_scene(rng)
        edits = rng.choice([0, 0, 1, 1, 2, 3, None])
        second = sample_scene(rng) if edits is None else first
        for _ in range(edits or 0):
            second = edit(second, rng)
        text = caption(first, rng)
        pairs.append((text, text if edits == 0 and rng.random() < 0.5 else caption(second, rng)))
    return pairs


def nearby_pairs(prompts: list[str], rng: random.Random, count: int) -> list[tuple[str, str]]:
    """Pairs from a prompt list in arrival order: mostly a prompt and one of the next few
    (users' edits sit close together in a trace), some at random."""
    pairs = []
    for _ in range(count):
        first = rng.randrange(len(prompts) - 1)
        second = (min(first + rng.randint(1, 8), len(prompts) - 1) if rng.random() < 0.8
                  else rng.randrange(len(prompts)))
        pairs.append((prompts[first], prompts[second]))
    return pairs


def stratify(pairs: list[tuple[str, str]], embedder: Embedder, edges: tuple[float, ...],
             per_bin: int) -> list[Cell]:
    """Up to ``per_bin`` pairs in each similarity bin [edge, next edge)."""
    texts = sorted({text for pair in pairs for text in pair})
    vectors = dict(zip(texts, embedder.embed(texts)))
    cells = [Cell(low, high) for low, high in zip(edges, (*edges[1:], 1.01))]
    for first, second in pairs:
        similarity = float(vectors[first] @ vectors[second])
        for cell in cells:
            if cell.low <= similarity < cell.high and len(cell.pairs) < per_bin:
                cell.pairs.append((first, second, similarity))
    return [cell for cell in cells if cell.pairs]


def measure(engine: Engine, scorer: Scorer, cells: list[Cell], steps: int, ks: list[int],
            guidance: float, size: int, seed: int, progress: bool = True) -> list[Cell]:
    """Fill each cell's scores: B from scratch, and B resumed from A's latent at each K."""
    def request(prompt: str, job_seed: int) -> JobRequest:
        return JobRequest(prompt, "", steps, guidance, job_seed, size, size)

    def quiet(done: int, total: int) -> None:
        return None

    bar = tqdm(total=sum(len(c.pairs) for c in cells), desc="profiling pairs", unit="pair",
               disable=not progress)
    for index, cell in enumerate(cells):
        second_prompts: list[str] = []
        scratch: list[np.ndarray] = []
        resumed: dict[int, list[np.ndarray]] = {k: [] for k in ks}
        for pair_index, (first, second, _) in enumerate(cell.pairs):
            pair_seed = seed + 1000 * index + pair_index
            source = engine.generate(request(first, pair_seed), quiet, frozenset(ks))
            # From scratch with A's seed: B's images then differ only in which prompt
            # guided the first K steps, so seed-to-seed spread does not swamp the ratio.
            scratch.append(png_pixels(engine.generate(request(second, pair_seed), quiet).image_png))
            for k in ks:
                resumed[k].append(png_pixels(engine.resume(request(second, pair_seed),
                                                        source.captured[k], k, quiet).image_png))
            second_prompts.append(second)
            bar.update()
        cell.scratch = scorer.score(second_prompts, np.stack(scratch)).tolist()
        cell.resumed = {k: scorer.score(second_prompts, np.stack(images)).tolist()
                        for k, images in resumed.items()}
    bar.close()
    return cells


def write_heatmap(cells: list[Cell], ks: list[int], steps: int, tolerance: float,
                  title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(reversed(cells))  # most similar on top
    grid = np.array([[cell.ratios()[k] for k in ks] for cell in rows])
    figure, axis = plt.subplots(figsize=(1.0 + 0.8 * len(ks), 1.2 + 0.45 * len(rows)))
    image = axis.imshow(grid, cmap="RdYlGn", vmin=0.5, vmax=1.1, aspect="auto")
    for (row, column), value in np.ndenumerate(grid):
        axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                  fontweight="bold" if value >= tolerance else "normal")
    axis.set_xticks(range(len(ks)), [str(k) for k in ks])
    axis.set_yticks(range(len(rows)),
                    [f"{c.low:.2f}-{min(c.high, 1.0):.2f} (n={len(c.pairs)})" for c in rows])
    axis.set_xlabel(f"K: steps taken from the cached latent (of {steps})")
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
    parser.add_argument("--embedder", default="minilm",
                        help="the triage embedder whose similarities the table keys on")
    parser.add_argument("--prompts", default="",
                        help="a file of prompts, one per line, in arrival order (default: "
                             "scene-world prompt pairs)")
    parser.add_argument("--candidates", type=int, default=3000,
                        help="candidate pairs drawn before binning")
    parser.add_argument("--pairs-per-bin", type=int, default=16)
    parser.add_argument("--edges", default=",".join(map(str, DEFAULT_EDGES)),
                        help="lower similarity edges of the bins")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    parser.add_argument("--ks", default="",
                        help="K values to profile (default: 10%%..80%% of --steps)")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--tolerance", type=float, default=0.95,
                        help="keep this fraction of the from-scratch score")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/k-profile",
                        help="output path without suffix (.json and .png)")
    parser.add_argument("--table-out", default="bench/results/k-table-profiled.json",
                        help="where the derived table goes (T2I_K_TABLE reads it)")
    args = parser.parse_args(argv)

    ks = ([int(k) for k in args.ks.split(",")] if args.ks
          else sorted({max(1, round(args.steps * f / 10)) for f in range(1, 9)}))
    if not all(0 < k < args.steps for k in ks):
        parser.error(f"--ks {ks}: every K must lie in 1..{args.steps - 1}")
    edges = tuple(float(edge) for edge in args.edges.split(","))
    rng = random.Random(args.seed)
    if args.prompts:
        lines = [line.strip() for line in Path(args.prompts).read_text().splitlines()]
        candidates = nearby_pairs([line for line in lines if line], rng, args.candidates)
    else:
        candidates = scene_pairs(rng, args.candidates)
    model = args.model if args.model == "tiny" else str(Path(args.model).expanduser())
    models_dir = load_settings().state_path / "models"  # where 'tiny' is built
    engine = Engine.load(model, "ddim", "cpu", models_dir, True)
    embedder = load_embedder(args.embedder, model, models_dir)
    scorer = load_scorer(args.scorer)
    cells = measure(engine, scorer, stratify(candidates, embedder, edges, args.pairs_per_bin),
                    args.steps, ks, args.guidance, args.size, args.seed)

    command = "python -m quality.profile " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {
        "command": command, "model": engine.label, "scorer": scorer.name,
        "embedder": embedder.name, "steps": args.steps, "ks": ks, "guidance": args.guidance,
        "tolerance": args.tolerance,
        "bins": [{"similarity_low": c.low, "similarity_high": min(c.high, 1.0),
                  "pairs": len(c.pairs),
                  "mean_similarity": float(np.mean([sim for _, _, sim in c.pairs])),
                  "scratch_score": float(np.mean(c.scratch)),
                  "resumed_score": {k: float(np.mean(v)) for k, v in c.resumed.items()},
                  "ratio": c.ratios(), "example": c.pairs[0][:2]} for c in cells],
    }
    for cell in reversed(cells):
        print(f"{cell.low:.2f}-{min(cell.high, 1.0):.2f} n={len(cell.pairs):3d} "
              + " ".join(f"K{k}:{r:.2f}" for k, r in cell.ratios().items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_heatmap(cells, ks, args.steps, args.tolerance,
                  f"{engine.label}, {scorer.name}, {embedder.name}", out.with_suffix(".png"))
    try:
        table = derive_table(f"profiled-{embedder.name}-{scorer.name}-{args.tolerance:g}",
                             args.steps, {c.low: c.ratios() for c in cells}, args.tolerance)
    except ValueError as exc:
        report["table"] = None
        out.with_suffix(".json").write_text(json.dumps(report, indent=2))
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report["table"] = json.loads(table.to_json())
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    Path(args.table_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.table_out).write_text(table.to_json() + "\n")
    print(f"table {table.name} (K of {args.steps}): {list(table.thresholds)} -> {args.table_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

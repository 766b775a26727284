"""How well a text-to-image model follows scene-world prompts, read by the evaluator.

    python -m quality.assess --model ~/.cache/t2i/models/scene-sd/model -n 200

For ``n`` held-out scenes: generate from the caption (through the serving engine, so any
diffusers model directory works), read the attributes back, and report mean prompt
adherence (with a 95% bootstrap interval over scenes, and per attribute kind) next to that
of the true rendered scenes (the evaluator's ceiling), plus an
FID-style distance between generated and true images on the evaluator's features. Writes
a JSON report and a labelled grid of samples (left: true scene, right: generated).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
from scipy import linalg
from tqdm import tqdm

from core.jobs import JobRequest
from quality import evaluator as evaluation
from quality.reroll import resamples
from quality.scenes import adherence, caption, render, sample_scene
from workers.engine import Engine


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance between Gaussian fits of two feature sets (as FID does)."""
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def attribute_accuracy(scenes: list, found: list[frozenset[str]]) -> dict[str, float]:
    """The fraction of asked attributes found, per kind: the background, and each object's
    shape, colour and size, read at the position the prompt named (so an object drawn in
    the wrong place misses all three)."""
    hits: dict[str, list[bool]] = {}
    for scene, read in zip(scenes, found):
        for attribute in scene.attributes():
            kind = attribute.split("=")[0].split(".")[-1]
            hits.setdefault(kind, []).append(attribute in read)
    return {kind: round(float(np.mean(values)), 4) for kind, values in sorted(hits.items())}


def generate(engine: Engine, prompt: str, seed: int, steps: int, guidance: float) -> np.ndarray:
    request = JobRequest(prompt, "", steps, guidance, seed, 64, 64)
    png = engine.generate(request, lambda step, total: None, frozenset()).image_png
    return evaluation.png_pixels(png)


def assess(engine: Engine, judge: evaluation.Evaluator, count: int, seed: int, steps: int,
           guidance: float, progress: bool = True) -> tuple[dict, list[np.ndarray]]:
    rng = random.Random(seed)
    scenes = [sample_scene(rng) for _ in range(count)]
    prompts = [caption(scene, rng) for scene in scenes]
    true = np.stack([render(scene) for scene in scenes])
    made = np.stack([generate(engine, prompt, seed + index, steps, guidance) for index, prompt
                     in enumerate(tqdm(prompts, desc="generating", disable=not progress))])
    true_t, made_t = evaluation.to_tensor(true), evaluation.to_tensor(made)
    found = {name: judge.read(images) for name, images in (("generated", made_t),
                                                            ("true", true_t))}
    scores = {name: [adherence(scene.attributes(), read) for scene, read in zip(scenes, reads)]
              for name, reads in found.items()}
    draws = resamples(count, 2000, seed)
    report = {
        "scenes": count, "steps": steps, "guidance": guidance,
        "adherence_generated": float(np.mean(scores["generated"])),
        "adherence_generated_ci95": np.percentile(
            np.array(scores["generated"])[draws].mean(1), [2.5, 97.5]).round(4).tolist(),
        "adherence_true_scenes": float(np.mean(scores["true"])),
        "attribute_accuracy_generated": attribute_accuracy(scenes, found["generated"]),
        "fid_evaluator_features": frechet_distance(judge.embed(made_t).numpy(),
                                                   judge.embed(true_t).numpy()),
        "samples": [{"prompt": p, "adherence": a} for p, a in
                    zip(prompts[:16], scores["generated"][:16])],
    }
    pairs = [np.concatenate([t, m], 1) for t, m in zip(true[:16], made[:16])]
    return report, pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a diffusers model directory")
    parser.add_argument("--evaluator", default=str(evaluation.DEFAULT_EVALUATOR),
                        help="weights from python -m quality.evaluator")
    parser.add_argument("-n", type=int, default=200, help="held-out scenes")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--out", default="bench/results/world-model",
                        help="output path without suffix (.json and -samples.png)")
    args = parser.parse_args(argv)
    engine = Engine.load(args.model, "ddim", "cpu", Path(args.model).parent, True)
    report, pairs = assess(engine, evaluation.load(Path(args.evaluator).expanduser()), args.n,
                           args.seed, args.steps, args.guidance)
    report["command"] = "python -m quality.assess " + " ".join(
        sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    if pairs:
        from bench.plots import labelled_grid

        labels = [f"adherence {sample['adherence']:.2f}: {sample['prompt'][:60]}"
                  for sample in report["samples"]]
        labelled_grid(pairs, ("true scene", "generated"), labels, scale=2).save(
            out.with_name(out.name + "-samples.png"))
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the scene-world LoRAs do, and from which step a LoRA may start acting.

    python -m quality.addons

For -n scene prompts (--seeds seeds each), each LoRA of --loras (files quality.lora wrote,
named after their style) is applied from each fraction of --froms of the steps on (the
earlier steps run on the base model: T2I_LORA_FROM, the time a worker has to load a missing
adapter), and the base model runs without it. The evaluator reads every image; per prompt:

- styled: adherence to the scene as the style changes it (palette swapped, all squares)
  under the unchanged caption: what the LoRA is for;
- asked: adherence to the caption itself.

Reported with 95% bootstrap intervals over prompts: each LoRA's effect (styled with it over
without), and each fraction's styled adherence over the LoRA acting from the first step.
The pick for T2I_LORA_FROM: the largest fraction whose ratio keeps >= 95% for every LoRA at
the interval's lower end. (A LoRA job's steps before that fraction are the base model's,
so a base-model latent cached at K <= fraction x N is what the job itself would compute.)
Writes OUT.json and OUT.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.addons import LoraRef, active_from, blob_key
from core.jobs import JobRequest
from core.settings import load_settings
from quality import evaluator as evaluation
from quality.evaluator import png_pixels
from quality.lora import STYLES
from quality.reroll import ADHERENCE_TARGET, quiet, ratio, resamples, seed_adherence, seed_reads
from quality.scenes import Scene, caption, sample_scene
from quality.step_cache import run_together
from workers.engine import Engine
from workers.lora import AdapterConfig

LORA_DIR = Path(__file__).resolve().parent / "weights" / "loras"


def images(engine: Engine, prompts: list[str], seeds: int, steps: int, guidance: float,
           size: int, loras: tuple[LoraRef, ...]) -> np.ndarray:
    """prompts x seeds x H x W x 3, all in one batch."""
    requests = [JobRequest(prompt, "", steps, guidance, seed, size, size, loras)
                for prompt in prompts for seed in range(seeds)]
    done = run_together(engine, [engine.begin(r, quiet) for r in requests])
    return np.array([png_pixels(g.image_png) for g in done]).reshape(
        len(prompts), seeds, size, size, 3)


def main(argv: list[str] | None = None) -> int:
    class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    parser.add_argument("--loras", default=",".join(str(LORA_DIR / f"{s}.safetensors")
                                                    for s in sorted(STYLES)),
                        help="LoRA files, comma-separated, each named STYLE.safetensors")
    parser.add_argument("-n", "--prompts", type=int, default=200, help="scene prompts")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    parser.add_argument("--froms", default="0,0.1,0.2,0.3,0.4,0.5",
                        help="fractions of the steps run before the LoRA acts")
    parser.add_argument("--scale", type=float, default=1.0, help="LoRA scale")
    evaluation.add_scoring_options(parser)
    parser.add_argument("--seed", type=int, default=11, help="draws the prompts")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    parser.add_argument("--out", default="bench/results/lora-profile-scene",
                        help="output path without suffix (.json and .png)")
    args = parser.parse_args(argv)

    paths = [Path(p).expanduser() for p in args.loras.split(",")]
    unknown = [p.stem for p in paths if p.stem not in STYLES]
    if unknown:
        parser.error(f"--loras: {unknown[0]!r} is not a style ({', '.join(sorted(STYLES))})")
    froms = sorted({float(f) for f in args.froms.split(",")})
    if 0.0 not in froms:
        parser.error("--froms must include 0 (the LoRA acting throughout: the reference)")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    judge = evaluation.load(Path(args.evaluator).expanduser())
    files = {}
    refs = {}
    for path in paths:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        files[blob_key(digest)] = data
        refs[path.stem] = LoraRef(path.stem, args.scale, digest)
    engine = Engine.load("scene", "ddim", "cpu", load_settings().state_path / "models", True,
                         adapters=AdapterConfig(files.__getitem__, 2**30))
    rng = random.Random(args.seed)
    scenes: list[Scene] = [sample_scene(rng) for _ in range(args.prompts)]
    prompts = [caption(scene, rng) for scene in scenes]
    draws = resamples(len(prompts), args.bootstrap, args.seed)
    base_seen = seed_reads(judge, images(engine, prompts, args.seeds, args.steps,
                                         args.guidance, args.size, ()))
    asked_truth = [scene.attributes() for scene in scenes]
    report_rows = []
    for style, ref in refs.items():
        styled_truth = [STYLES[style](scene).attributes() for scene in scenes]
        without = {"styled": seed_adherence(base_seen, styled_truth, args.seeds),
                   "asked": seed_adherence(base_seen, asked_truth, args.seeds)}
        measured = {}
        for fraction in froms:
            engine.lora_from = fraction
            seen = seed_reads(judge, images(engine, prompts, args.seeds, args.steps,
                                            args.guidance, args.size, (ref,)))
            measured[fraction] = {"styled": seed_adherence(seen, styled_truth, args.seeds),
                                  "asked": seed_adherence(seen, asked_truth, args.seeds)}
        for fraction in froms:
            mine = measured[fraction]
            row: dict[str, Any] = {
                "lora": style, "from": fraction,
                "lora_from_step": active_from(args.steps, fraction),
                "styled": round(float(mine["styled"].mean()), 4),
                "asked": round(float(mine["asked"].mean()), 4),
                "styled_without_lora": round(float(without["styled"].mean()), 4),
                "asked_without_lora": round(float(without["asked"].mean()), 4),
                "effect": ratio(mine["styled"], without["styled"], draws),
                "vs_from_0": ratio(mine["styled"], measured[0.0]["styled"], draws)}
            row["keeps"] = (row["vs_from_0"]["ci95"] or [0.0])[0] >= ADHERENCE_TARGET
            report_rows.append(row)
    passing = [f for f in froms
               if all(r["keeps"] for r in report_rows if r["from"] <= f)]
    command = " ".join(["python -m quality.addons", *(sys.argv[1:] if argv is None else argv)])
    report = {"command": command, "model": engine.label, "scheduler": "ddim",
              "prompts": len(prompts), "seeds": args.seeds, "steps": args.steps,
              "guidance": args.guidance, "size": args.size, "scale": args.scale,
              "loras": {style: ref.digest for style, ref in refs.items()},
              "bootstrap_resamples": args.bootstrap,
              "target": {"styled_ratio_min": ADHERENCE_TARGET,
                         "applied_to": "95% interval lower end, against the LoRA acting "
                                       "from the first step, every LoRA, every smaller "
                                       "fraction too"},
              "rows": report_rows, "pick": max(passing, default=0.0),
              "seconds": round(time.monotonic() - started, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    write_plot(report_rows, f"{engine.label}: {len(prompts)} prompts x {args.seeds} seeds, "
               f"{args.steps} steps", out.with_suffix(".png"))
    print(f"{'lora':14s} {'from':>5s} {'styled':>7s} {'asked':>6s} {'effect':>22s} "
          f"{'vs from 0':>22s}")
    for row in report_rows:
        cells = " ".join(f"{c['value']:.3f} [{c['ci95'][0]:.3f},{c['ci95'][1]:.3f}]".rjust(22)
                         for c in (row["effect"], row["vs_from_0"]))
        print(f"{row['lora']:14s} {row['from']:5.2f} {row['styled']:7.3f} {row['asked']:6.3f} "
              f"{cells}" + (" *" if row["keeps"] else ""))
    print(f"pick T2I_LORA_FROM={report['pick']}; {report['seconds']:.0f} s -> "
          f"{out.with_suffix('.json')}")
    return 0


def write_plot(rows: list[dict], title: str, path: Path) -> None:
    from bench.plots import write_ratio_panels  # matplotlib loads only when a plot is drawn

    styles = list(dict.fromkeys(r["lora"] for r in rows))
    write_ratio_panels(
        {style: [(r["from"], r) for r in rows if r["lora"] == style] for style in styles},
        (("effect", "styled adherence, with the LoRA over without", 1.0),
         ("vs_from_0", "styled adherence, over the LoRA acting from step 0",
          ADHERENCE_TARGET)),
        "fraction of the steps run before the LoRA acts (T2I_LORA_FROM)", title, path,
        nudge=0.01)


if __name__ == "__main__":
    sys.exit(main())

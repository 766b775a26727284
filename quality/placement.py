"""How well the layout ControlNet places objects, and what it does to prompt adherence.

    python -m quality.placement

For -n scene prompts (--seeds seeds each), each with a layout map drawn with the renderer's
jitter (quality.controlnet: where exactly the objects go, which the caption does not say),
the scene model runs with the ControlNet and without it. Per prompt: placement (intersection
over union of the drawn objects with the map's silhouettes) and adherence to the caption
(the evaluator). Reported with 95% bootstrap intervals over prompts, as means and as ratios
with over without. Writes OUT.json.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.addons import ControlRef, control_key
from core.jobs import JobRequest
from core.settings import load_settings
from quality import evaluator as evaluation
from quality.controlnet import SCENE_CONTROLNET_DIR, layout_map, placement
from quality.evaluator import png_pixels
from quality.reroll import quiet, ratio, resamples, seed_adherence, seed_reads
from quality.scenes import caption, sample_scene
from quality.step_cache import run_together
from workers.controlnet import ControlConfig
from workers.engine import Engine


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def interval(values: np.ndarray, draws: np.ndarray) -> dict[str, object]:
    boot = values[draws].mean(1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"value": round(float(values.mean()), 4),
            "ci95": [round(float(low), 4), round(float(high), 4)]}


def main(argv: list[str] | None = None) -> int:
    class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    parser.add_argument("--controlnet", default=str(SCENE_CONTROLNET_DIR),
                        help="the layout ControlNet (python -m quality.controlnet)")
    parser.add_argument("-n", "--prompts", type=int, default=200, help="scene prompts")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    parser.add_argument("--scale", type=float, default=1.0, help="ControlNet scale")
    evaluation.add_scoring_options(parser, size=False)
    parser.add_argument("--seed", type=int, default=13, help="draws the prompts and layouts")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    parser.add_argument("--out", default="bench/results/controlnet-placement-scene",
                        help="output path without suffix (.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    judge = evaluation.load(Path(args.evaluator).expanduser())
    rng = random.Random(args.seed)
    scenes = [sample_scene(rng) for _ in range(args.prompts)]
    jitters = [rng.randrange(2**31) for _ in scenes]
    prompts = [caption(scene, rng) for scene in scenes]
    layouts = [layout_map(scene, jitter) for scene, jitter in zip(scenes, jitters)]
    digests = [hashlib.sha256(png(layout)).hexdigest() for layout in layouts]
    stored = {control_key(digest): png(layout) for digest, layout in zip(digests, layouts)}
    engine = Engine.load("scene", "ddim", "cpu", load_settings().state_path / "models", True,
                         controls=ControlConfig(stored.__getitem__, {"layout": args.controlnet},
                                                parallel=False))
    size = layouts[0].shape[0]
    results = {}
    for arm in ("without", "with"):
        requests = [JobRequest(prompt, "", args.steps, args.guidance, seed, size, size,
                               controlnet=ControlRef("layout", args.scale, digest)
                               if arm == "with" else None)
                    for prompt, digest in zip(prompts, digests) for seed in range(args.seeds)]
        done = run_together(engine, [engine.begin(r, quiet) for r in requests])
        pictures = np.array([png_pixels(g.image_png) for g in done]).reshape(
            len(prompts), args.seeds, size, size, 3)
        results[arm] = {
            "placement": np.array([np.mean([placement(picture, layout) for picture in row])
                                   for row, layout in zip(pictures, layouts)]),
            "adherence": seed_adherence(seed_reads(judge, pictures),
                                        [scene.attributes() for scene in scenes], args.seeds)}
    draws = resamples(len(prompts), args.bootstrap, args.seed)
    report = {
        "command": " ".join(["python -m quality.placement", *(sys.argv[1:] if argv is None
                                                               else argv)]),
        "model": engine.label, "controlnet": args.controlnet, "prompts": len(prompts),
        "seeds": args.seeds, "steps": args.steps, "guidance": args.guidance, "size": size,
        "scale": args.scale, "bootstrap_resamples": args.bootstrap,
        **{f"{measure}_{arm}": interval(results[arm][measure], draws)
           for measure in ("placement", "adherence") for arm in ("without", "with")},
        **{f"{measure}_ratio": ratio(results["with"][measure], results["without"][measure],
                                     draws) for measure in ("placement", "adherence")},
        "seconds": round(time.monotonic() - started, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    for measure in ("placement", "adherence"):
        cells = [report[f"{measure}_{arm}"] for arm in ("without", "with")]
        print(f"{measure:9s} without {cells[0]['value']:.3f} {cells[0]['ci95']}, with "
              f"{cells[1]['value']:.3f} {cells[1]['ci95']}, ratio "
              f"{report[f'{measure}_ratio']['value']} {report[f'{measure}_ratio']['ci95']}")
    print(f"{report['seconds']:.0f} s -> {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

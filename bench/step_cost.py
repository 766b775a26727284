"""What a step with the step cache costs against a whole-UNet step, and what that makes of
UNet compute per image.

    python -m bench.step_cost --replay bench/results/replay-full-step-cache.json

Per model of --models ('scene': the trained scene model at its 64 px; 'sd15': SD 1.5's UNet
architecture, random weights, at 512 px, 64 x 64 latents): the FLOPs of one UNet call on a
guided job's two rows, whole and shallow (workers.step_cache.SplitUNet; counted by torch's
FlopCounterMode), and the median wall time of --repeats calls of each on this machine's CPU.
A shallow step costs the shallow / whole FLOP ratio of a whole one.

With --replay (a bench.replay result: its run-length histogram), UNet compute per image as a
fraction of the steps requested, for plain, across-request reuse only (the replay's runs),
within-request only (each interval, core.stepcache's rule) and both. Writes OUT.json, OUT.md
and OUT.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from core.errors import SettingError
from core.stepcache import StepCache
from workers.builtin_models import SCENE_MODEL_DIR, SD15_UNET
from workers.step_cache import SplitUNet

TOKENS = 77  # CLIP's context: what encoder_hidden_states holds per row


def load_unet(model: str) -> tuple[UNet2DConditionModel, int]:
    """(the UNet, its latent side) for a --models name."""
    if model == "scene":
        unet = UNet2DConditionModel.from_pretrained(SCENE_MODEL_DIR / "unet")
        return unet.eval(), int(unet.config.sample_size)
    if model == "sd15":
        torch.manual_seed(0)
        return UNet2DConditionModel(in_channels=4, out_channels=4, **SD15_UNET).eval(), 64
    raise SystemExit(f"--models: {model!r} is neither 'scene' nor 'sd15'")


@torch.inference_mode()
def measure(model: str, repeats: int) -> dict[str, Any]:
    unet, side = load_unet(model)
    split = SplitUNet(unet)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, side, side, generator=generator)
    text = torch.randn(2, TOKENS, unet.config.cross_attention_dim, generator=generator)
    timesteps = torch.tensor([500.0, 500.0])
    whole, shallow = torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)
    _, deep = split(sample, timesteps, text, whole, None)

    def whole_call() -> Any:
        return split(sample, timesteps, text, whole, None)

    def shallow_call() -> Any:
        return split(sample, timesteps, text, shallow, deep)

    row: dict[str, Any] = {"model": model, "latent": [side, side], "rows": 2,
                           "parameters_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1)}
    for name, call in (("whole", whole_call), ("shallow", shallow_call)):
        counter = FlopCounterMode(display=False)
        with counter:
            call()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
        row[f"gflops_{name}"] = round(counter.get_total_flops() / 1e9, 3)
        row[f"ms_{name}"] = round(1e3 * statistics.median(times), 2)
    row["shallow_cost_flops"] = round(row["gflops_shallow"] / row["gflops_whole"], 4)
    row["shallow_cost_time"] = round(row["ms_shallow"] / row["ms_whole"], 4)
    return row


def compute_per_image(replay: dict[str, Any], caches: list[StepCache],
                      shallow_cost: float) -> list[dict[str, Any]]:
    """UNet compute over the steps requested, in whole-UNet steps, per step cache: without
    reuse (every request runs its N from 0) and with (each from the step the replay's plan
    ran it from)."""
    runs = [(int(n), int(start), int(count)) for n, start, count in replay["runs"]]
    total = sum(n * count for n, _, count in runs)
    rows = []
    for cache in caches:
        plain = sum(cache.unet_cost(0, n, shallow_cost) * count for n, _, count in runs)
        reused = sum(cache.unet_cost(start, n, shallow_cost) * count for n, start, count in runs)
        rows.append({"step_cache": cache.spec, "without_reuse": round(plain / total, 4),
                     "with_reuse": round(reused / total, 4)})
    return rows


def main(argv: list[str] | None = None) -> int:
    class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    parser.add_argument("--models", default="scene,sd15", help="scene, sd15")
    parser.add_argument("--step-caches", default="off,deepcache:2,deepcache:3,deepcache:3:0.2,"
                        "deepcache:4:0.2,deepcache:5:0.2,deepcache:8:0.2,deepcache:5:0.3",
                        help="T2I_STEP_CACHE values to convert the replay's runs for")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each kind")
    parser.add_argument("--replay", default="", help="a bench.replay JSON with run lengths")
    parser.add_argument("--replay-row", type=int, default=0, help="which of its rows")
    parser.add_argument("--cost-model", default="sd15",
                        help="the model whose shallow-step FLOP ratio converts the replay")
    parser.add_argument("--out", default="bench/results/step-cost",
                        help="output path without suffix (.json, .md, .png)")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    if args.replay and args.cost_model not in models:
        parser.error("--cost-model must be one of --models")
    started = time.perf_counter()
    rows = []
    for model in models:
        rows.append(measure(model, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    try:
        caches = [StepCache.parse(spec) for spec in args.step_caches.split(",")]
    except SettingError as exc:
        parser.error(f"--step-caches: {exc}")
    result: dict[str, Any] = {
        "command": "python -m bench.step_cost " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"CPU ({platform.machine()}, {torch.get_num_threads()} torch threads)",
        "torch": torch.__version__, "per_call": rows}
    lines = ["| model | latent | GFLOPs whole | GFLOPs shallow | shallow/whole FLOPs | "
             "ms whole | ms shallow | shallow/whole time |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['latent'][0]}x{r['latent'][1]} | {r['gflops_whole']} | "
              f"{r['gflops_shallow']} | {r['shallow_cost_flops']:.3f} | {r['ms_whole']} | "
              f"{r['ms_shallow']} | {r['shallow_cost_time']:.3f} |" for r in rows]
    if args.replay:
        replay = json.loads(Path(args.replay).read_text())
        chosen = replay["rows"][args.replay_row]
        cost = next(r for r in rows if r["model"] == args.cost_model)["shallow_cost_flops"]
        table = compute_per_image(chosen, caches, cost)
        result["compute_per_image"] = {"replay": replay["command"], "rules": chosen["rules"],
                                       "steps_saved_frac": chosen["steps_saved_frac"],
                                       "shallow_cost": cost, "cost_model": args.cost_model,
                                       "rows": table}
        lines += ["", f"UNet compute per image / plain ({args.cost_model} FLOPs, shallow step "
                  f"{cost:.3f} of a whole one; runs from `{replay['command']}`, rules "
                  f"{chosen['rules']}):", "", "| step cache | without reuse | with reuse |",
                  "|---|---|---|"]
        lines += [f"| {r['step_cache']} | {r['without_reuse']:.3f} | {r['with_reuse']:.3f} |"
                  for r in table]
    result["seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(f"`{result['command']}` on {result['machine']}\n\n"
                                      + "\n".join(lines) + "\n")
    if args.replay:
        from bench.plots import write_compute_bars

        write_compute_bars(result["compute_per_image"]["rows"],
                           f"UNet compute per image, whole trace ({args.cost_model} FLOP costs)",
                           out.with_suffix(".png"))
    print("\n".join(lines))
    print(f"written {out}.json ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a denoising step costs on this machine's accelerator, at each batch size: the GPU
benchmark (bench/gpu/run.sh runs it on a bare machine with torch).

    bench/gpu/run.sh                      # SD 1.5's architecture, fp16, 512 px, on CUDA
    python -m bench.gpu_step --model tiny --device cpu --size 64 --steps 10 --k 5 \\
        --batches 1,2 --timed-steps 2     # the dry run, anywhere

For batch sizes B and both kinds of job (full: N steps from noise; resumed: N - K steps
from a cached latent, its noise swapped, as a re-roll hit runs), B jobs of distinct prompts
and seeds advance together through the engine's batched step (workers.engine.advance, what
a T2I_GPU_BATCH worker runs): ms per batched UNet call, images per second (B / (ms per
call x steps per image), plus the VAE decode), and peak accelerator memory; for each step
cache of --step-caches (core.stepcache: the timed steps mix whole and shallow ones as a
job's schedule does). Also the
triage-side cost per prompt of the `clip` embedder (the served model's text encoder) on
this device. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from core.errors import SettingError
from core.jobs import JobRequest
from core.plan import Reseed, SeedRule
from core.stepcache import StepCache
from workers.engine import Engine

PROMPTS = ["a lighthouse on a cliff at sunset", "a red fox in the snow", "a bowl of ramen",
           "a city street in the rain at night", "a watercolor of a heron in reeds",
           "a paper boat on a puddle", "an astronaut riding a horse", "a cabin in a pine forest"]


def quiet(step: int, total: int) -> None:
    pass


def synchronised(device: torch.device) -> Callable[[], float]:
    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
    return clock


def measure(engine: Engine, batch: int, resumed: bool, args: argparse.Namespace,
            clock: Callable[[], float]) -> dict[str, Any]:
    requests = [JobRequest(PROMPTS[i % len(PROMPTS)] + f", take {i}", "", args.steps, 7.5,
                           i + 1, args.size, args.size) for i in range(batch)]
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    if resumed:   # a cached latent of another seed, as a re-roll hit resumes from it
        cached = torch.randn(engine.latent_shape(requests[0]), generator=torch.Generator()
                             .manual_seed(0))
        trajectories = [engine.begin(r, quiet, frozenset(), cached, args.k,
                                     Reseed(SeedRule.NOISE_SWAP, 0, args.k)) for r in requests]
    else:
        trajectories = [engine.begin(r, quiet) for r in requests]
    for _ in range(args.warmup_steps):
        engine.advance(trajectories)
    started = clock()
    for _ in range(args.timed_steps):
        engine.advance(trajectories)
    ms_per_call = 1e3 * (clock() - started) / args.timed_steps
    begun = clock()
    engine.finish(trajectories[0])
    decode_ms = 1e3 * (clock() - begun)
    steps = args.steps - (args.k if resumed else 0)
    seconds_per_batch = ms_per_call * steps / 1e3 + batch * decode_ms / 1e3
    return {"kind": "resumed" if resumed else "full", "step_cache": engine.step_cache.spec,
            "batch": batch, "steps_run": steps,
            "ms_per_unet_call": round(ms_per_call, 3),
            "ms_per_image_step": round(ms_per_call / batch, 3),
            "decode_ms_per_image": round(decode_ms, 3),
            "images_per_s": round(batch / seconds_per_batch, 3),
            "peak_memory_gib": (round(torch.cuda.max_memory_allocated(engine.device) / 2**30, 3)
                                if engine.device.type == "cuda" else None)}


def embed_cost(engine: Engine, clock: Callable[[], float], count: int = 20) -> dict[str, Any]:
    """ms per prompt of the `clip` embedder (the model's text encoder), one prompt a call,
    as triage embeds."""
    with torch.inference_mode():
        engine.pipe.encode_prompt(PROMPTS[0], engine.device, 1, False)
        started = clock()
        for i in range(count):
            engine.pipe.encode_prompt(f"{PROMPTS[i % len(PROMPTS)]} {i}", engine.device, 1, False)
    return {"embedder": "clip (the model's text encoder)", "prompts": count,
            "ms_per_prompt": round(1e3 * (clock() - started) / count, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15-random", help="a T2I_MODEL value")
    parser.add_argument("--device", default="auto", help="auto, cuda, cpu")
    parser.add_argument("--models-dir", default="/tmp/t2i-models",
                        help="where built-in models are built")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=50, help="N")
    parser.add_argument("--k", type=int, default=25, help="resumed jobs' K")
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--timed-steps", type=int, default=10)
    parser.add_argument("--step-caches", default="off,deepcache:3:0.2",
                        help="T2I_STEP_CACHE values to measure, each on the same weights")
    parser.add_argument("--out", default="bench/results/gpu-step.json")
    args = parser.parse_args(argv)
    if args.warmup_steps + args.timed_steps > args.steps - args.k:
        parser.error("--warmup-steps + --timed-steps must fit in the resumed jobs' N - K steps")
    try:
        step_caches = [StepCache.parse(spec) for spec in args.step_caches.split(",")]
    except SettingError as exc:
        parser.error(f"--step-caches: {exc}")
    started = time.perf_counter()
    engine = Engine.load(args.model, "ddim", args.device, Path(args.models_dir), offline=True)
    loaded_s = time.perf_counter() - started
    clock = synchronised(engine.device)
    rows = []
    for step_cache in step_caches:
        cached = Engine(engine.pipe, "ddim", engine.device, engine.label, step_cache)
        for resumed in (False, True):
            for batch in (int(b) for b in args.batches.split(",")):
                rows.append(measure(cached, batch, resumed, args, clock))
                print(json.dumps(rows[-1]), flush=True)
    device = (torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda"
              else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)")
    result = {"command": "python -m bench.gpu_step " + " ".join(sys.argv[1:] if argv is None
                                                                else argv),
              "device": device, "torch": torch.__version__, "model": engine.label,
              "dtype": str(engine.pipe.unet.dtype), "size": args.size, "steps": args.steps,
              "k": args.k, "model_load_s": round(loaded_s, 1), "rows": rows,
              "triage": embed_cost(engine, clock),
              "seconds": round(time.perf_counter() - started, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written {out} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

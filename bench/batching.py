"""Step-level batching, measured in process: the engine behind a BatchingEngine at several
batch sizes, the same open-loop arrivals for each, cache on (a mix of full jobs and jobs
resumed at K with their noise swapped) and off (all full).

    python -m bench.batching --batches 1,4,8,16 --jobs 64 --rounds 2 --threads 1

On a CPU use --threads 1: torch run from a thread other than the main one (the batcher's,
or any Celery task thread) with 2 OpenMP threads was 3.5x slower per job on this 2-core
machine (1.00 s against 0.28 s in the main thread) and as fast as the main thread with 1;
a CPU worker that batches wants T2I_TORCH_THREADS=1 likewise. (No such effect on a GPU.)

Jobs come from the toy trace's prompts, 25 steps at 64 px with the scene model by default.
Arrivals are Poisson at --rate jobs/s (default: 1.5x what batch 1 sustains, measured first,
so batch 1 is overloaded and larger batches show what they absorb). Each job is a thread
that waits for its arrival time and calls generate or resume, as a Celery task thread of
a batching GPU worker does; latency is arrival to image. The configurations run in
alternating rounds, so the machine's noise falls on all of them. No Celery, Redis or S3
here: this isolates what batching does to the GPU worker (the live stack runs the same
BatchingEngine with T2I_GPU_BATCH). Writes OUT.json and OUT.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from core.jobs import JobRequest
from core.plan import Reseed, SeedRule
from quality.toy_trace import Behaviour, toy_trace
from workers.batcher import BatchingEngine
from workers.engine import Engine


def quiet(step: int, total: int) -> None:
    pass


def workload(count: int, steps: int, size: int, resumed_fraction: float, seed: int
             ) -> list[tuple[JobRequest, bool]]:
    """(request, resumed?) per job, from the toy trace's prompts and seeds."""
    rows = toy_trace(count, users=4, behaviour=Behaviour(), guidance=4.0, seed=seed)
    draw = random.Random(seed)
    return [(JobRequest(str(row["prompt"]), "", steps, 4.0, int(str(row["seed"])), size, size),
             draw.random() < resumed_fraction) for row in rows]


def run(engine: Engine, batch: int, jobs: list[tuple[JobRequest, bool]],
        arrivals: list[float], source: dict[str, Any], k: int) -> dict[str, Any]:
    """One configuration: every job submitted at its arrival time; latencies and rate."""
    batching = BatchingEngine(engine, batch)
    latencies: list[float] = [0.0] * len(jobs)
    peaks: list[int] = [0] * len(jobs)
    origin = time.perf_counter() + 0.05

    def one(index: int) -> None:
        request, resumed = jobs[index]
        time.sleep(max(0.0, origin + arrivals[index] - time.perf_counter()))
        if resumed:
            reseed = Reseed(SeedRule.NOISE_SWAP, source["seed"], k)
            result = batching.resume(request, source["latent"], k, quiet, reseed=reseed)
        else:
            result = batching.generate(request, quiet)
        latencies[index] = time.perf_counter() - origin - arrivals[index]
        peaks[index] = result.batch_peak

    with ThreadPoolExecutor(len(jobs)) as threads:
        list(threads.map(one, range(len(jobs))))
    batching.close()
    finished = max(arrivals[i] + latencies[i] for i in range(len(jobs)))
    values = np.array(latencies)
    return {"batch": batch, "jobs": len(jobs), "throughput_jobs_s": len(jobs) / finished,
            "latency_mean_s": float(values.mean()),
            "latency_p50_s": float(np.percentile(values, 50)),
            "latency_p99_s": float(np.percentile(values, 99)),
            "latencies_s": [round(v, 4) for v in latencies],
            "batch_peak_mean": float(np.mean(peaks))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="scene", help="a T2I_MODEL value")
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--batches", default="1,4,8,16", help="batch sizes to compare")
    parser.add_argument("--jobs", type=int, default=64, help="jobs per configuration")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--resumed", type=float, default=0.5,
                        help="cache on: the fraction of jobs resumed at --k")
    parser.add_argument("--k", type=int, default=10, help="resumed jobs' K (of --steps)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="arrivals per second (0: 1.5x batch 1's measured throughput)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/batching-cpu",
                        help="output path without suffix (.json and .png)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    engine = Engine.load(args.model, args.scheduler, args.device, Path("~/.cache/t2i/models")
                         .expanduser(), offline=True)
    cache_on = workload(args.jobs, args.steps, args.size, args.resumed, args.seed)
    arms = {"cache on": cache_on, "cache off": [(request, False) for request, _ in cache_on]}
    source_request = replace(cache_on[0][0], seed=10_000)
    source = {"seed": source_request.seed,
              "latent": engine.generate(source_request, quiet,
                                        frozenset({args.k})).captured[args.k]}

    started = time.perf_counter()
    rate = args.rate
    if not rate:   # batch 1's sustained rate, jobs back to back, cache off
        probe = arms["cache off"][:8]
        begun = time.perf_counter()
        for request, _ in probe:
            engine.generate(request, quiet)
        rate = 1.5 * len(probe) / (time.perf_counter() - begun)
    gaps = np.random.default_rng(args.seed).exponential(1.0 / rate, size=args.jobs)
    arrivals = list(np.cumsum(gaps) - gaps[0])
    rows: list[dict[str, Any]] = []
    configs = [(arm, batch) for arm in arms for batch in batches]
    with tqdm(total=args.rounds * len(configs), desc="configurations", unit="run") as bar:
        for round_number in range(args.rounds):
            for arm, batch in configs:
                row = run(engine, batch, arms[arm], arrivals, source, args.k)
                rows.append({"round": round_number, "arm": arm, **row})
                bar.update()
    result = summarise(rows, batches, arms)
    result.update({
        "command": "python -m bench.batching " + " ".join(argv if argv is not None
                                                          else sys.argv[1:]),
        "machine": f"{platform.node()}: {platform.machine()}, "
                   f"{'CUDA ' + torch.cuda.get_device_name() if engine.device.type == 'cuda' else 'CPU'}"
                   f", {torch.get_num_threads()} torch threads",
        "model": engine.label, "steps": args.steps, "size": args.size, "k": args.k,
        "resumed_fraction": args.resumed, "rate_jobs_s": rate, "jobs": args.jobs,
        "rounds": args.rounds, "seconds": round(time.perf_counter() - started, 1),
        "rows": rows})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    for arm in arms:
        for batch in batches:
            cell = result["by_config"][arm][str(batch)]
            print(f"{arm:9} batch {batch:2}: {cell['throughput_jobs_s']:.2f} jobs/s, latency "
                  f"mean {cell['latency_mean_s']:.2f} p50 {cell['latency_p50_s']:.2f} "
                  f"p99 {cell['latency_p99_s']:.2f} s")
    for arm, cells in result["throughput_ratio_over_batch_1"].items():
        print(f"{arm}: throughput over batch 1: "
              + ", ".join(f"batch {b} {cell['mean']:.2f}x" for b, cell in cells.items()))
    print(f"written {out.with_suffix('.json')}")
    return 0


def summarise(rows: list[dict[str, Any]], batches: list[int], arms: dict[str, Any]
              ) -> dict[str, Any]:
    """Per (arm, batch): means over rounds; throughput ratios over batch 1 per round."""
    by_config: dict[str, dict[str, Any]] = {}
    for arm in arms:
        by_config[arm] = {}
        for batch in batches:
            mine = [r for r in rows if r["arm"] == arm and r["batch"] == batch]
            by_config[arm][str(batch)] = {
                key: float(np.mean([r[key] for r in mine]))
                for key in ("throughput_jobs_s", "latency_mean_s", "latency_p50_s",
                            "latency_p99_s", "batch_peak_mean")}
    ratios: dict[str, Any] = {}
    if 1 in batches:
        for arm in arms:
            ratios[arm] = {}
            for batch in batches:
                per_round = [
                    next(r for r in rows if r["arm"] == arm and r["batch"] == batch
                         and r["round"] == n)["throughput_jobs_s"]
                    / next(r for r in rows if r["arm"] == arm and r["batch"] == 1
                           and r["round"] == n)["throughput_jobs_s"]
                    for n in sorted({r["round"] for r in rows})]
                ratios[arm][str(batch)] = {"mean": float(np.mean(per_round)),
                                           "per_round": [round(x, 3) for x in per_round]}
    return {"by_config": by_config, "throughput_ratio_over_batch_1": ratios,
            "throughput_ratio": {arm: cells.get("8", {}).get("mean")
                                 for arm, cells in ratios.items()}}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, cells in result["by_config"].items():
        batches = sorted(int(b) for b in cells)
        left.plot(batches, [cells[str(b)]["throughput_jobs_s"] for b in batches], "o-",
                  label=arm)
    left.set(xlabel="batch size (T2I_GPU_BATCH)", ylabel="jobs / s", xscale="log",
             title=f"throughput at {result['rate_jobs_s']:.2f} arrivals/s")
    left.set_xticks(batches, [str(b) for b in batches])
    left.legend()
    for row in result["rows"]:
        if row["arm"] == "cache on" and row["round"] == 0:
            values = np.sort(row["latencies_s"])
            right.plot(values, np.arange(1, len(values) + 1) / len(values),
                       label=f"batch {row['batch']}")
    right.set(xlabel="latency, arrival to image (s)", ylabel="fraction of jobs",
              title="latency CDF, cache on, round 1")
    right.legend()
    fig.suptitle(f"{result['model']}, {result['steps']} steps, {result['size']} px; "
                 f"{result['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

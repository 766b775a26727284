"""End-to-end job latency through a running stack, one job at a time (no queueing).

    python -m bench.latency -n 20 --size 64 --steps 50

Reports median and p95 of submit -> finished, with the stage breakdown (triage, wait for a
GPU worker, generation), and writes a JSON file to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

from producer.client import Client

STAGES = {
    "end_to_end_s": ("submitted_at", "finished_at"),
    "to_triage_s": ("submitted_at", "triage_started_at"),
    "triage_s": ("triage_started_at", "triage_finished_at"),
    "gpu_wait_s": ("triage_finished_at", "generation_started_at"),
    "generation_s": ("generation_started_at", "generation_finished_at"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--count", type=int, default=20, help="jobs to time")
    parser.add_argument("--size", type=int, default=64, help="width and height")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed jobs first (model load)")
    parser.add_argument("--out", default="bench/results/latency.json", help="JSON output path")
    args = parser.parse_args(argv)

    client = Client()
    samples: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for index in tqdm(range(args.warmup + args.count), desc="jobs", unit="job"):
        job_id = client.submit(f"latency probe {index}: a small house by a lake",
                               steps=args.steps, width=args.size, height=args.size, seed=index)
        view = client.wait(job_id, timeout=900)
        if view["state"] != "succeeded":
            print(f"job {job_id} ended {view['state']}: {view['error']}", file=sys.stderr)
            return 1
        if index < args.warmup:
            continue
        timings = view["timings"]
        for stage, (start, end) in STAGES.items():
            samples[stage].append(timings[end] - timings[start])

    summary = {stage: {"median": statistics.median(values),
                       "p95": statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]}
               for stage, values in samples.items()}
    result = {
        "command": "python -m bench.latency " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.node()} ({platform.machine()}, CPU only)",
        "model": view["model"], "jobs": args.count, "size": args.size, "steps": args.steps,
        "summary": summary, "samples": samples, "measured_at": time.strftime("%Y-%m-%d %H:%M"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for stage, values in summary.items():
        print(f"{stage:14} median {values['median']:.3f}s  p95 {values['p95']:.3f}s")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

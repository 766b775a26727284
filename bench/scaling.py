"""Horizontal scaling: throughput with 1 vs 2 GPU-worker processes, same trace slice.

    python -m bench.scaling --limit 40 --rounds 2

One local stack (fresh state, cache off so every job is the same full generation). Each
round submits the slice at once and times until the last job finishes, first with one GPU
worker, then with a second one started beside it (ABAB... across rounds, so machine noise
falls on both). Each worker process gets T2I_TORCH_THREADS=1, as one worker per GPU would
get one GPU. Writes bench/results/scaling.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from bench.replay_live import arm_settings, trace_job
from core.errors import InvalidRequest
from core.jobs import RequestLimits, parse_request
from core.settings import Settings, load_settings
from core.trace import DEFAULT_TRACE, TraceRequest, read_trace
from infra import servers, stack
from producer.client import Client


def timed_batch(client: Client, requests: list[TraceRequest], steps: int, divisor: int,
                label: str) -> tuple[float, int]:
    """Submit all at once; seconds until the last one finished (all must succeed), and how
    many worker processes generated them."""
    started = time.monotonic()
    ids = [client.submit(**trace_job(r, steps, divisor, client.settings.max_prompt_chars))
           for r in requests]
    for job_id in tqdm(ids, desc=label, unit="job", leave=False):
        view = client.wait(job_id, timeout=3600)
        if view["state"] != "succeeded":
            raise RuntimeError(f"job {job_id} {view['state']}: {view['error']}")
    elapsed = time.monotonic() - started
    return elapsed, len({client.jobs.get(job_id).worker for job_id in ids})


def second_worker(config: Settings, log_dir: Path) -> int:
    service = servers.gpu_worker("gpu2", config)
    process = servers.start(service, log_dir / "gpu2.log")
    servers.wait_ready(service, process, log_dir / "gpu2.log")
    return process.pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default=str(DEFAULT_TRACE), help="trace CSV(.gz)")
    parser.add_argument("--channel", default="W1-dream-10", help="channel to take the slice from")
    parser.add_argument("--limit", type=int, default=40, help="jobs per batch")
    parser.add_argument("--rounds", type=int, default=2, help="(1 worker, 2 workers) pairs")
    parser.add_argument("--steps", type=int, default=10, help="steps of a 50-step request")
    parser.add_argument("--size-divisor", type=int, default=8,
                        help="trace image side / this = job image side (at least 64)")
    parser.add_argument("--out", default="bench/results/scaling", help="output path, no suffix")
    args = parser.parse_args(argv)

    base = load_settings()
    limits = RequestLimits.from_settings(base)

    def accepted(request: TraceRequest) -> bool:
        """Every job must run: leave out the few trace requests the API refuses."""
        try:
            parse_request(trace_job(request, args.steps, args.size_divisor,
                                    limits.max_prompt_chars), limits, random_seed=0)
        except InvalidRequest:
            return False
        return True

    requests = [r for r in read_trace(Path(args.trace), limit=args.limit * 2,
                                      channel=args.channel) if accepted(r)][:args.limit]
    seconds: dict[str, list[float]] = {"1 worker": [], "2 workers": []}
    workers_used: dict[str, list[int]] = {"1 worker": [], "2 workers": []}
    with tempfile.TemporaryDirectory(prefix="t2i-scaling-") as tmp:
        config = arm_settings(base, Path(tmp), cache_on=False)
        try:
            stack.up(config)
            client = Client(config)
            client.wait(client.submit("warm-up", steps=args.steps, width=64, height=64), 600)
            for round_ in range(args.rounds):
                for arm in seconds:
                    pid = second_worker(config, Path(tmp) / "logs") if arm == "2 workers" else 0
                    try:
                        elapsed, used = timed_batch(client, requests, args.steps,
                                                    args.size_divisor, f"round {round_} {arm}")
                    finally:
                        if pid:
                            servers.stop_pid(pid)
                    seconds[arm].append(elapsed)
                    workers_used[arm].append(used)
        finally:
            stack.down(config)

    throughput = {arm: [len(requests) / s for s in runs] for arm, runs in seconds.items()}
    ratios = [b / a for a, b in zip(throughput["1 worker"], throughput["2 workers"])]
    result = {
        "command": "python -m bench.scaling " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.node()}: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "jobs_per_batch": len(requests), "steps": args.steps, "seconds": seconds,
        "worker_processes_used": workers_used,
        "throughput_jobs_per_s": throughput, "ratio_2_over_1_per_round": ratios,
        "ratio_2_over_1_median": statistics.median(ratios),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [f"# Scaling: 1 vs 2 GPU-worker processes, {len(requests)} jobs per batch", "",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']}", "",
             "| round | 1 worker (jobs/s) | 2 workers (jobs/s) | ratio |", "|---|---|---|---|"]
    lines += [f"| {i} | {a:.3f} | {b:.3f} | {r:.2f} |" for i, (a, b, r) in
              enumerate(zip(throughput["1 worker"], throughput["2 workers"], ratios))]
    lines += ["", f"Median throughput ratio 2/1: **{result['ratio_2_over_1_median']:.2f}**"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Adapter affinity, simulated: how many LoRA loads and how much waiting each mode of the
routing rule (core.affinity.preferred_worker, the function triage calls) saves over sending
every job to the shared queue (off), with several GPU workers each keeping an LRU of
resident LoRAs.

    python -m bench.affinity --workers 4 --jobs 20000

A discrete-event simulation, not a run of the stack: Poisson arrivals at --load of the
workers' capacity; --lora-share of the jobs carry one of --adapters LoRAs (Zipf --zipf);
each worker runs --batch jobs at once, --service-s each, taking from its own queue and the
shared one in turn (as kombu rotates them); a job whose LoRA the worker does not hold loads
it in the background and waits only for what the load takes beyond the first --lora-from of
its steps (workers.lora); a worker keeps --resident LoRAs (least recently used out) and
tells triage what it holds as a job starts and ends, as the live worker does. Each mode
runs on the same arrivals; --seeds traces give the spread (mean, min, max). Load times to
try: --cold-s 0.091 is a 48.7 MB SD-1.5 LoRA fetched from a local S3 and parsed on this CPU
(bench/results/addons-cpu.json); a far store or a bigger file (SDXL's) takes longer.
"""

from __future__ import annotations

import argparse
import heapq
import json
import platform
import sys
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from core.affinity import MODES, WorkerView, preferred_worker
from core.settings import load_settings


@dataclass
class Job:
    arrival: float
    lora: str | None
    finish: float = 0.0
    waited_for_adapter: float = 0.0
    cold: bool = False


@dataclass
class Worker:
    node: str
    slots: int
    resident_max: int
    running: int = 0
    own: deque[Job] = field(default_factory=deque)
    resident: OrderedDict[str, None] = field(default_factory=OrderedDict)
    told: frozenset[str] = frozenset()   # what it last told triage it holds
    own_next: bool = False

    def view(self) -> WorkerView:
        return WorkerView(self.node, self.told, self.slots, self.running + len(self.own))

    def hold(self, lora: str) -> bool:
        """Make ``lora`` most recently used; whether it was resident already."""
        held = lora in self.resident
        self.resident[lora] = None
        self.resident.move_to_end(lora)
        while len(self.resident) > self.resident_max:
            self.resident.popitem(last=False)
        return held


def trace(args: argparse.Namespace, seed: int) -> list[Job]:
    rng = np.random.default_rng(seed)
    rate = args.load * args.workers * args.batch / args.service_s
    arrivals = np.cumsum(rng.exponential(1.0 / rate, args.jobs))
    popularity = 1.0 / np.arange(1, args.adapters + 1) ** args.zipf
    loras = rng.choice(args.adapters, args.jobs, p=popularity / popularity.sum())
    carries = rng.random(args.jobs) < args.lora_share
    return [Job(float(at), f"lora-{lora}" if carry else None)
            for at, lora, carry in zip(arrivals, loras, carries, strict=True)]


def simulate(jobs: list[Job], args: argparse.Namespace, cold_s: float,
             mode: str) -> dict[str, float]:
    workers = [Worker(f"gpu-{n}", args.batch, args.resident) for n in range(args.workers)]
    by_node = {worker.node: worker for worker in workers}
    shared: deque[Job] = deque()
    finishing: list[tuple[float, int, str]] = []   # (when, job number, node)
    running: dict[int, Job] = {}
    done: list[Job] = []
    hidden_s = args.lora_from * args.service_s

    def start(worker: Worker, job: Job, now: float) -> None:
        worker.told = frozenset(worker.resident)      # told as the job starts
        worker.running += 1
        if job.lora is not None and not worker.hold(job.lora):
            job.cold, job.waited_for_adapter = True, max(0.0, cold_s - hidden_s)
        job.finish = now + args.service_s + job.waited_for_adapter
        running[id(job)] = job
        heapq.heappush(finishing, (job.finish, id(job), worker.node))

    def dispatch(worker: Worker, now: float) -> None:
        while worker.running < worker.slots and (worker.own or shared):
            # kombu takes from the worker's queues in turn (it rotates their order)
            worker.own_next = not worker.own_next if worker.own and shared else bool(worker.own)
            start(worker, (worker.own if worker.own_next else shared).popleft(), now)

    for job in [*jobs, None]:
        until = job.arrival if job is not None else float("inf")
        while finishing and finishing[0][0] <= until:
            now, number, finished_on = heapq.heappop(finishing)
            worker = by_node[finished_on]
            worker.running -= 1
            worker.told = frozenset(worker.resident)  # and as it ends
            done.append(running.pop(number))
            dispatch(worker, now)
        if job is None:
            break
        chosen = preferred_worker([job.lora], [w.view() for w in workers], mode) \
            if job.lora else None
        (by_node[chosen].own if chosen else shared).append(job)
        for worker in ([by_node[chosen]] if chosen else workers):
            dispatch(worker, job.arrival)
    latency = np.array([job.finish - job.arrival for job in done])
    with_lora = [job for job in done if job.lora is not None]
    return {"cold_loads_per_lora_job": sum(job.cold for job in with_lora) / len(with_lora),
            "adapter_wait_mean_s": float(np.mean([job.waited_for_adapter for job in with_lora])),
            "latency_mean_s": float(latency.mean()),
            "latency_p95_s": float(np.percentile(latency, 95))}


def main(argv: list[str] | None = None) -> int:
    class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    parser.add_argument("--workers", type=int, default=4, help="GPU workers")
    parser.add_argument("--batch", type=int, default=1, help="jobs each runs at once")
    parser.add_argument("--jobs", type=int, default=20000, help="jobs per trace")
    parser.add_argument("--load", type=float, default=0.8, help="arrivals over capacity")
    parser.add_argument("--service-s", type=float, default=2.0, help="a job's run time")
    parser.add_argument("--adapters", type=int, default=200, help="distinct LoRAs")
    parser.add_argument("--zipf", type=float, default=1.1, help="popularity skew")
    parser.add_argument("--lora-share", type=float, default=0.7, help="jobs with a LoRA")
    parser.add_argument("--resident", type=int, default=10,
                        help="LoRAs a worker holds (T2I_LORA_CACHE_MB 512 / 48.7 MB)")
    parser.add_argument("--lora-from", type=float, default=load_settings({}).lora_from,
                        help="fraction of a job's steps that hide a load (T2I_LORA_FROM)")
    parser.add_argument("--cold-s", default="0.091,1.0,3.0",
                        help="LoRA load times to try (fetch and parse)")
    parser.add_argument("--seeds", type=int, default=5, help="traces")
    parser.add_argument("--out", default="bench/results/affinity-sim",
                        help="output path without suffix (.json and .png)")
    args = parser.parse_args(argv)
    colds = [float(value) for value in args.cold_s.split(",")]
    rows = []
    with tqdm(total=len(colds) * args.seeds * len(MODES), desc="simulating", unit="run") as bar:
        for cold_s in colds:
            arms: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
            for seed in range(args.seeds):
                jobs = trace(args, seed)
                for mode, runs in arms.items():
                    runs.append(simulate([Job(job.arrival, job.lora) for job in jobs], args,
                                         cold_s, mode))
                    bar.update()
            ratios = {f"{mode}_latency_over_off": _spread(
                [{"ratio": run["latency_mean_s"] / off["latency_mean_s"]}
                 for run, off in zip(arms[mode], arms["off"], strict=True)])["ratio"]
                for mode in MODES if mode != "off"}
            rows.append({"cold_s": cold_s, **{mode: _spread(runs) for mode, runs in arms.items()},
                         **ratios})
    result = {"command": " ".join(["python -m bench.affinity",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "simulated": True, "machine": platform.node(),
              **{name: value for name, value in vars(args).items() if name != "out"},
              "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    for row in rows:
        print(f"LoRA load {row['cold_s']:g} s: loads per LoRA job " + ", ".join(
            f"{mode} {row[mode]['cold_loads_per_lora_job']['mean']:.3f}" for mode in MODES)
            + "; mean latency over off " + ", ".join(
            f"{mode} x{row[f'{mode}_latency_over_off']['mean']:.3f}" for mode in MODES
            if mode != "off"))
    print(f"written {out.with_suffix('.json')}")
    return 0


def _spread(runs: list[dict[str, float]]) -> dict[str, Any]:
    """Each measure's mean, min and max over the traces."""
    return {name: {"mean": float(np.mean([run[name] for run in runs])),
                   "min": float(min(run[name] for run in runs)),
                   "max": float(max(run[name] for run in runs))} for name in runs[0]}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    xs = np.arange(len(rows))
    for offset, mode in zip((-0.27, 0, 0.27), MODES, strict=True):
        axes[0].bar(xs + offset, [row[mode]["cold_loads_per_lora_job"]["mean"] for row in rows],
                    0.27, label=f"T2I_LORA_AFFINITY={mode}")
    for offset, mode in zip((-0.2, 0.2), MODES[1:], strict=True):
        ratios = [row[f"{mode}_latency_over_off"] for row in rows]
        means = np.array([ratio["mean"] for ratio in ratios])
        spans = np.array([[m - r["min"] for m, r in zip(means, ratios, strict=True)],
                          [r["max"] - m for m, r in zip(means, ratios, strict=True)]])
        axes[1].bar(xs + offset, means, 0.4, yerr=spans, capsize=3, label=mode,
                    color=f"C{MODES.index(mode)}")
    axes[1].axhline(1.0, color="black", linewidth=0.8)
    for axis, label in zip(axes, ("LoRA loads per LoRA job",
                                  "mean latency over off (min-max of traces)"), strict=True):
        axis.set_xticks(xs, [f"{row['cold_s']:g} s" for row in rows])
        axis.set_xlabel("time to load a LoRA (fetch and parse)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3, axis="y")
    axes[0].set_ylim(0, 0.8)
    axes[0].legend(fontsize=7, loc="upper right")
    figure.suptitle(f"simulated: {result['workers']} workers x batch {result['batch']}, "
                    f"{result['adapters']} LoRAs (Zipf {result['zipf']}), {result['resident']} "
                    f"resident each, load {result['load']}, {result['jobs']} jobs x "
                    f"{result['seeds']} traces", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())

"""A burst of submissions through the HTTP API from several producers at once, then every job
followed to its end: accepted submissions per second, and the account of outcomes.

    python -m bench.load --url http://127.0.0.1:8000 \
        --key "$(cat ~/.local/state/t2i/secrets/api-key-default)" -n 2000

Jobs use 1 denoising step at 64x64, so the run measures the submission path, not the GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

ENDED = {"succeeded", "failed", "cancelled", "lost"}  # lost: the job record is gone


@dataclass
class BurstReport:
    submitted: int
    accepted: int
    refused: Counter = field(default_factory=Counter)         # HTTP status -> count
    seconds: float = 0.0
    accepted_per_s: float = 0.0
    job_ids: list[str] = field(default_factory=list)


def burst(base_url: str, key: str, count: int, producers: int) -> BurstReport:
    """``count`` submissions split over ``producers`` threads, each with its own connection."""
    def produce(worker: int) -> tuple[list[str], Counter]:
        ids: list[str] = []
        refused: Counter[int] = Counter()
        with httpx.Client(base_url=base_url, timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as http:
            for index in range(worker, count, producers):
                response = http.post("/v1/jobs", json={
                    "prompt": f"load test {index % 97}: a lantern in the fog", "steps": 1,
                    "width": 64, "height": 64, "seed": index})
                if response.status_code == 202:
                    ids.append(response.json()["id"])
                else:
                    refused[response.status_code] += 1
        return ids, refused

    started = time.perf_counter()
    with ThreadPoolExecutor(producers) as pool:
        results = list(pool.map(produce, range(producers)))
    seconds = time.perf_counter() - started
    report = BurstReport(submitted=count, accepted=0, seconds=seconds)
    for ids, refused in results:
        report.job_ids += ids
        report.refused += refused
    report.accepted = len(report.job_ids)
    report.accepted_per_s = report.accepted / seconds
    return report


def cancel_all(base_url: str, key: str, job_ids: list[str], producers: int) -> None:
    """Cancel every job (finished ones stay as they are), as users who give up would."""
    def cancel(part: list[str]) -> None:
        with httpx.Client(base_url=base_url, timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as http:
            for job_id in part:
                http.delete(f"/v1/jobs/{job_id}").raise_for_status()

    with ThreadPoolExecutor(producers) as pool:
        list(pool.map(cancel, [job_ids[i::producers] for i in range(producers)]))


def _state(http: httpx.Client, job_id: str) -> str:
    response = http.get(f"/v1/jobs/{job_id}")
    return response.json()["state"] if response.status_code == 200 else "lost"


def follow(base_url: str, key: str, job_ids: list[str], timeout_s: float) -> Counter:
    """Poll until every job has ended; the outcome of each ('lost' if its record is gone,
    'unfinished' if the timeout came first)."""
    outcomes: Counter = Counter()
    pending = list(job_ids)  # jobs end roughly in submission order: poll the oldest first
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=base_url, timeout=60,
                      headers={"Authorization": f"Bearer {key}"}) as http, \
            tqdm(total=len(job_ids), desc="jobs finished", unit="job") as bar:
        while pending and time.monotonic() < deadline:
            still: list[str] = []
            for job_id in pending:
                if still:  # an older job is still running: look at the rest next round
                    still.append(job_id)
                    continue
                state = _state(http, job_id)
                if state in ENDED:
                    outcomes[state] += 1
                    bar.update()
                else:
                    still.append(job_id)
            pending = still
            time.sleep(0.5)
        for job_id in pending:  # out of time: account for each of the rest
            state = _state(http, job_id)
            outcomes[state if state in ENDED else "unfinished"] += 1
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the HTTP API")
    parser.add_argument("--key", required=True, help="an API key (T2I_API_KEYS)")
    parser.add_argument("-n", "--count", type=int, default=2000, help="submissions")
    parser.add_argument("--producers", type=int, default=4, help="concurrent producers")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the jobs")
    parser.add_argument("--cancel", action="store_true",
                        help="cancel every job after the burst (when the GPUs are too slow to "
                             "drain it), then account for each")
    parser.add_argument("--out", default="bench/results/load.json", help="JSON output path")
    args = parser.parse_args(argv)

    report = burst(args.url, args.key, args.count, args.producers)
    print(f"accepted {report.accepted}/{report.submitted} in {report.seconds:.1f}s: "
          f"{report.accepted_per_s:.0f} submissions/s")
    if args.cancel:
        cancel_all(args.url, args.key, report.job_ids, args.producers)
    outcomes = follow(args.url, args.key, report.job_ids, args.timeout)
    print(dict(outcomes))
    command = (f"python -m bench.load --url {args.url} --key KEY -n {args.count} "
               f"--producers {args.producers}" + (" --cancel" if args.cancel else ""))
    summary = {k: v for k, v in asdict(report).items() if k != "job_ids"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "command": command, "machine": f"{platform.node()} ({platform.machine()}, CPU only)",
        "producers": args.producers, "cancelled_after_burst": args.cancel, "burst": summary,
        "outcomes": dict(outcomes),
        "measured_at": time.strftime("%Y-%m-%d %H:%M")}, indent=2))
    print(f"written {args.out}")
    return 0 if outcomes["lost"] == outcomes["unfinished"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

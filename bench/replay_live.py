"""Live replay: a trace slice through two real local stacks at once, cache on and cache off.

    python -m bench.replay_live --channel W1-dream-10 --limit 2000 --steps 10

Both stacks (Redis, S3, API, Celery triage/cache and GPU workers, beat, Flower; fresh state
in a temporary directory) run side by side on this machine and get the same requests in the
same order and arrival times, so machine noise hits both alike: one job in flight per stack
(closed loop, the default) or Poisson arrivals at --rate jobs/s (open loop). With
--step-cache SPEC two more stacks run beside them with that step cache (T2I_STEP_CACHE),
cache on and off: plain, across-request reuse only, within-request only, and both, with UNet
compute per image (whole-UNet steps plus shallow ones at their counted FLOP cost) and
measured generation time, each against plain.
Image sizes are the trace's divided by --size-divisor (partitions stay distinct; the CPU
test model stays fast); guidance comes from the trace (default 7.5), seeds too.
Writes a JSON and a Markdown summary to bench/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from core.errors import InvalidRequest, SettingError
from core.settings import Settings, ensure_secrets, load_settings
from core.stepcache import OFF, StepCache
from core.trace import DEFAULT_TRACE, TraceRequest, read_trace
from infra import stack
from infra.ports import free_port
from producer.client import Client
from quality.evaluator import Evaluator, png_pixels, to_tensor
from quality.reroll import feature_distance, pixel_distance, ratio, resamples
from quality.scoring import load_scorer
from workers.builtin_models import cache_embedder, cache_k_table


def arm_settings(base: Settings, state_dir: Path, cache_on: bool,
                 step_cache: str | None = None) -> Settings:
    return ensure_secrets(dataclasses.replace(
        base, cache_enabled=cache_on, state_dir=str(state_dir),
        step_cache=step_cache or base.step_cache,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        s3_endpoint=f"127.0.0.1:{free_port()}", s3_master_port=free_port(),
        api_port=free_port(), flower_port=free_port(), chroma_path="",
        chroma_url="", torch_threads=1))


def job_params(request: TraceRequest, steps: int, divisor: int) -> dict[str, Any]:
    def side(pixels: int) -> int:
        return max(64, round(pixels / divisor / 8) * 8)
    # A request's own step count (50 when the trace has none) scales by steps/50, so the
    # trace's step partitions stay distinct.
    scaled_steps = max(2, round((request.steps or 50) * steps / 50))
    return {"steps": scaled_steps, "seed": request.seed, "width": side(request.width),
            "height": side(request.height), "guidance": request.cfg if request.cfg else 7.5}


def trace_job(request: TraceRequest, steps: int, divisor: int,
              max_prompt_chars: int) -> dict[str, Any]:
    """The job a trace request becomes: its prompt (cut to the allowed length) and params."""
    return {"prompt": request.prompt[:max_prompt_chars], **job_params(request, steps, divisor)}


def _submit(client: Client, request: TraceRequest, steps: int, divisor: int,
            views: list[dict]) -> str | None:
    try:
        return client.submit(**trace_job(request, steps, divisor,
                                         client.settings.max_prompt_chars))
    except InvalidRequest as exc:  # the trace has a few (e.g. guidance 100): refused
        views.append({"state": "refused", "error": str(exc)})
        return None


def drive(client: Client, requests: list[TraceRequest], steps: int, divisor: int,
          views: list[dict], progress: tqdm, rate: float, seed: int) -> None:
    """Closed loop (rate 0): one job in flight. Open loop: Poisson arrivals at ``rate`` per
    second whatever the stack's backlog (the same seeded times for both arms), then every
    job awaited."""
    if not rate:
        for request in requests:
            if job_id := _submit(client, request, steps, divisor, views):
                views.append(client.wait(job_id, timeout=900))
            progress.update()
        return
    arrivals, due, submitted = random.Random(seed), time.monotonic(), []
    for request in requests:
        due += arrivals.expovariate(rate)
        time.sleep(max(0.0, due - time.monotonic()))
        if job_id := _submit(client, request, steps, divisor, views):
            submitted.append(job_id)
        else:
            progress.update()
    for job_id in submitted:
        views.append(client.wait(job_id, timeout=3600))
        progress.update()


def was_resumed(view: dict) -> bool:
    """The job ran from a cached latent (a planned resume that fell back ran in full)."""
    return (view["cache"] or {}).get("route") == "resume"


def was_exact(view: dict) -> bool:
    """An identical finished request's image answered the job (no step ran)."""
    return (view["cache"] or {}).get("route") == "exact"


def by_request(views: list[dict]) -> dict[tuple[str, int, int], dict]:
    """Succeeded jobs keyed by (prompt, seed, occurrence): the same request in either arm."""
    seen: Counter[tuple[str, int]] = Counter()
    keyed = {}
    for view in views:
        asked = (view["request"]["prompt"], view["request"]["seed"])
        seen[asked] += 1
        if view["state"] == "succeeded":
            keyed[(*asked, seen[asked])] = view
    return keyed


def latency(view: dict) -> float:
    """Submit to finish, end to end."""
    return view["timings"]["finished_at"] - view["timings"]["submitted_at"]


def paired_intervals(views: dict[str, list[dict]]) -> dict[str, Any]:
    """95% bootstrap intervals over the requests both arms answered: steps saved (cache on)
    and mean latency on / off."""
    on, off = by_request(views["cache_on"]), by_request(views["cache_off"])
    both = sorted(set(on) & set(off))
    if not both:
        return {}
    draws = resamples(len(both))
    requested = np.array([on[key]["request"]["steps"] for key in both], dtype=float)
    ran = np.array([on[key]["unet_calls"] for key in both], dtype=float)
    return {"requests": len(both),
            "steps_saved_frac": ratio(requested - ran, requested, draws),
            "latency_ratio_on_off": ratio(np.array([latency(on[key]) for key in both]),
                                          np.array([latency(off[key]) for key in both]), draws)}


def unet_compute(views: dict[str, list[dict]], shallow_cost: float) -> dict[str, Any]:
    """Per arm, over the requests every arm answered, with 95% bootstrap intervals: UNet
    compute per image over the steps asked (a shallow step at ``shallow_cost`` of a whole
    one), and generation time and latency over plain's (cache_off) for the same requests."""
    keyed = {name: by_request(arm_views) for name, arm_views in views.items()}
    both = sorted(set.intersection(*(set(k) for k in keyed.values())))
    if not both:
        return {}
    draws = resamples(len(both))

    def per_job(name: str, measure: Callable[[dict], float]) -> np.ndarray:
        return np.array([measure(keyed[name][key]) for key in both], dtype=float)

    def compute(view: dict) -> float:
        shallow = view.get("shallow_unet_calls") or 0
        return view["unet_calls"] - shallow + shallow_cost * shallow

    def generation(view: dict) -> float:  # the exact path generates nothing
        timings = view["timings"]
        if timings.get("generation_started_at") is None:
            return 0.0
        return timings["generation_finished_at"] - timings["generation_started_at"]

    asked = per_job("cache_off", lambda view: view["request"]["steps"])
    return {"requests": len(both), "shallow_cost": shallow_cost, "arms": {
        name: {"step_cache": keyed[name][both[0]].get("step_cache"),
               "compute_per_image_frac": ratio(per_job(name, compute), asked, draws),
               "generation_time_ratio": ratio(per_job(name, generation),
                                              per_job("cache_off", generation), draws),
               "latency_ratio": ratio(per_job(name, latency), per_job("cache_off", latency),
                                      draws)}
        for name in views}}


def summarise(views: list[dict]) -> dict[str, Any]:
    def span(view: dict, start: str, end: str) -> float:
        return view["timings"][end] - view["timings"][start]

    done = [v for v in views if v["state"] == "succeeded"]
    resumed = [v for v in done if was_resumed(v)]
    exact = [v for v in done if was_exact(v)]
    latencies = [latency(v) for v in done]
    generation = [span(v, "generation_started_at", "generation_finished_at") for v in done
                  if not was_exact(v)]
    requested = sum(v["request"]["steps"] for v in done)
    saved = requested - sum(v["unet_calls"] for v in done)  # what ran, as the workers counted
    reasons: dict[str, int] = {}
    for v in done:
        reason = (v["cache"] or {}).get("reason") or "none"
        reasons[reason] = reasons.get(reason, 0) + 1

    def mean_of(key: str) -> float | None:
        values = [v["timings"][key] for v in done if v["timings"].get(key) is not None]
        return statistics.fmean(values) if values else None

    return {
        "jobs": len(views), "succeeded": len(done),
        "refused": sum(1 for v in views if v["state"] == "refused"),
        "hit_rate": (len(resumed) + len(exact)) / len(done) if done else 0.0,
        "exact": len(exact),
        "seed_rules": dict(Counter(v["cache"]["seed_rule"] for v in resumed
                                   if v["cache"].get("seed_rule"))),
        "mean_k_on_hit_of_50": (statistics.fmean(v["cache"]["k"] * 50 / v["request"]["steps"]
                                                for v in resumed)
                                if resumed else None),
        "steps_saved_frac": saved / requested if requested else 0.0,
        "fallbacks": sum(1 for v in done if (v["cache"] or {}).get("fallback")),
        "route_reasons": reasons,
        "latency_mean_s": statistics.fmean(latencies),
        "latency_p50_s": statistics.median(latencies),
        "latency_p95_s": statistics.quantiles(latencies, n=20)[-1],
        "latency_p99_s": statistics.quantiles(latencies, n=100)[-1],
        "generation_mean_s": statistics.fmean(generation),
        "embed_ms_mean": mean_of("embed_ms"), "lookup_ms_mean": mean_of("lookup_ms"),
        "latent_fetch_ms_mean": mean_of("latent_fetch_ms"),
        "throughput_jobs_per_s": len(done) / (max(v["timings"]["finished_at"] for v in done)
                                              - min(v["timings"]["submitted_at"] for v in done)),
        "latencies_s": sorted(round(latency, 4) for latency in latencies),
    }


def fetch_images(client: Client, views: list[dict]) -> dict[str, np.ndarray]:
    """Job id -> RGB pixels of every succeeded job."""
    return {v["id"]: png_pixels(client.result(v["id"])) for v in views
            if v["state"] == "succeeded"}


def score_arms(scorer_spec: str, views: dict[str, list[dict]],
               images: dict[str, dict[str, np.ndarray]], grid_path: Path,
               grid_size: int = 8) -> dict[str, Any]:
    """Image scores of both arms; resumed jobs are also compared with the very same requests
    (prompt and seed) generated from scratch by the cache-off arm. Writes a grid of resumed
    (left) vs from-scratch (right) images for the first resumed jobs."""
    scorer = load_scorer(scorer_spec)
    scores: dict[str, dict[str, float]] = {}
    for name, arm_images in images.items():
        ids = list(arm_images)
        prompts = {v["id"]: v["request"]["prompt"] for v in views[name] if v.get("id")}
        values = scorer.score([prompts[i] for i in ids], np.stack([arm_images[i] for i in ids]))
        scores[name] = dict(zip(ids, values.tolist()))

    def key(view: dict) -> tuple[str, int]:
        return view["request"]["prompt"], view["request"]["seed"]

    scratch = {key(v): v["id"] for v in views["cache_off"] if v["state"] == "succeeded"}
    resumed = [v for v in views["cache_on"] if v["state"] == "succeeded"
               and was_resumed(v) and key(v) in scratch]
    full = [v for v in views["cache_on"] if v["state"] == "succeeded" and v not in resumed]
    pairs = [(v["id"], scratch[key(v)]) for v in resumed]
    if pairs:
        from bench.plots import labelled_grid  # matplotlib loads only when a grid is drawn

        rows = [np.concatenate([images["cache_on"][a], images["cache_off"][b]], 1)
                for a, b in pairs[:grid_size]]
        labels = [f"K {v['cache']['k']}, similarity {v['cache']['similarity']:.2f}, seed "
                  f"{v['request']['seed']}: {v['request']['prompt'][:48]}"
                  for v in resumed[:grid_size]]
        labelled_grid(rows, ("resumed", "from scratch"), labels).save(grid_path)

    def mean(values: list[float]) -> float | None:
        return statistics.fmean(values) if values else None

    resumed_on = mean([scores["cache_on"][a] for a, _ in pairs])
    same_off = mean([scores["cache_off"][b] for _, b in pairs])
    adherence_ratio = (ratio(np.array([scores["cache_on"][a] for a, _ in pairs]),
                             np.array([scores["cache_off"][b] for _, b in pairs]),
                             resamples(len(pairs))) if pairs else None)
    on, off = by_request(views["cache_on"]), by_request(views["cache_off"])
    both = sorted(set(on) & set(off))
    return {
        "scorer": scorer.name,
        "score_ratio_resumed_vs_scratch_ci95": adherence_ratio,
        "score_ratio_all_jobs_on_off_ci95": ratio(
            np.array([scores["cache_on"][on[key]["id"]] for key in both]),
            np.array([scores["cache_off"][off[key]["id"]] for key in both]),
            resamples(len(both))) if both else None,
        "reroll_diversity": reroll_diversity(views, images, getattr(scorer, "judge", None)),
        "arms_vs_cache_off": {name: arm_vs_plain(name, views, images, scores,
                                                 getattr(scorer, "judge", None))
                              for name in views if name != "cache_off"},
        "score_mean_cache_on": mean(list(scores["cache_on"].values())),
        "score_mean_cache_off": mean(list(scores["cache_off"].values())),
        "score_mean_resumed": resumed_on,
        "score_mean_resumed_same_requests_from_scratch": same_off,
        "score_ratio_resumed_vs_scratch": (resumed_on / same_off
                                           if resumed_on is not None and same_off else None),
        "score_mean_full_cache_on": mean([scores["cache_on"][v["id"]] for v in full]),
        "resumed_compared": len(pairs),
        "samples": [{"prompt": v["request"]["prompt"], "k": v["cache"]["k"],
                     "similarity": v["cache"]["similarity"],
                     "score_resumed": scores["cache_on"][a],
                     "score_from_scratch": scores["cache_off"][b]}
                    for v, (a, b) in zip(resumed[:grid_size], pairs[:grid_size])],
    }


def arm_vs_plain(name: str, views: dict[str, list[dict]],
                 images: dict[str, dict[str, np.ndarray]], scores: dict[str, dict[str, float]],
                 judge: Evaluator | None) -> dict[str, Any]:
    """An arm's image scores over cache_off's for the same requests, and its re-roll
    diversity over cache_off's, with 95% bootstrap intervals."""
    arm, off = by_request(views[name]), by_request(views["cache_off"])
    both = sorted(set(arm) & set(off))
    return {"score_ratio_ci95": ratio(np.array([scores[name][arm[key]["id"]] for key in both]),
                                      np.array([scores["cache_off"][off[key]["id"]]
                                                for key in both]), resamples(len(both))),
            "reroll_diversity": reroll_diversity(views, images, judge, name)}


def interval(cell: dict[str, Any]) -> str:
    """A ratio with its interval, as ``quality.reroll.ratio`` gives them."""
    if cell.get("value") is None:
        return "-"
    low, high = cell["ci95"]
    return f"**{cell['value']:.3f}** [{low:.3f}, {high:.3f}]"


def reroll_diversity(views: dict[str, list[dict]], images: dict[str, dict[str, np.ndarray]],
                     judge: Evaluator | None, arm: str = "cache_on") -> dict[str, Any] | None:
    """Re-roll diversity of ``arm`` and cache_off: per prompt asked with several seeds, the
    mean pairwise distance between its images (pixels; the evaluator's features when the
    scorer has one), ``arm`` over cache off (the same requests from scratch, plain), with a
    95% bootstrap interval over prompts."""
    groups: dict[str, dict[str, list[str]]] = {}
    for name, arm_views in views.items():
        by_prompt: dict[str, dict[int, str]] = {}
        for view in arm_views:
            if view["state"] == "succeeded":
                by_prompt.setdefault(view["request"]["prompt"], {})[view["request"]["seed"]] = \
                    view["id"]
        groups[name] = {prompt: [ids[seed] for seed in sorted(ids)]
                        for prompt, ids in by_prompt.items() if len(ids) >= 2}
    prompts = sorted(set(groups[arm]) & set(groups["cache_off"]))
    prompts = [p for p in prompts if len(groups[arm][p]) == len(groups["cache_off"][p])]
    if not prompts:
        return None

    def per_prompt(name: str, distance: Callable[[np.ndarray, np.ndarray], np.ndarray],
                   embed: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        values = []
        for prompt in prompts:
            items = embed(np.stack([images[name][i] for i in groups[name][prompt]]))
            values.append(np.mean([distance(items[a], items[b]) for a, b in
                                   itertools.combinations(range(len(items)), 2)]))
        return np.array(values)

    measures: dict[str, tuple[Callable, Callable]] = {"pixels": (pixel_distance, lambda x: x)}
    if judge is not None:
        measures["evaluator_features"] = (
            feature_distance, lambda x: judge.embed(to_tensor(x)).numpy())
    draws = resamples(len(prompts))
    report: dict[str, Any] = {"prompts": len(prompts),
                              "images": sum(len(groups[arm][p]) for p in prompts)}
    for measure, (distance, embed) in measures.items():
        on, off = per_prompt(arm, distance, embed), per_prompt("cache_off", distance, embed)
        report[measure] = {arm: float(on.mean()), "cache_off": float(off.mean()),
                           "ratio_on_off": ratio(on, off, draws)}
    return report


def markdown(result: dict[str, Any]) -> str:
    on, off = result["cache_on"], result["cache_off"]
    rows = [
        ("jobs succeeded", f"{on['succeeded']}/{on['jobs']}", f"{off['succeeded']}/{off['jobs']}"),
        ("refused at submit (invalid)", f"{on['refused']}", f"{off['refused']}"),
        ("hit rate (resumed or exact)", f"{on['hit_rate']:.1%}", f"{off['hit_rate']:.1%}"),
        ("exact path (identical request)", f"{on['exact']}", f"{off['exact']}"),
        ("seed rules on resumes", f"{on['seed_rules'] or '-'}", "-"),
        ("mean K on hits (of 50)", f"{on['mean_k_on_hit_of_50'] or 0:.1f}", "-"),
        ("denoising steps saved (UNet calls counted)", f"{on['steps_saved_frac']:.1%}",
         f"{off['steps_saved_frac']:.1%}"),
        ("mean latency (s)", f"{on['latency_mean_s']:.3f}", f"{off['latency_mean_s']:.3f}"),
        ("p50 / p95 / p99 latency (s)",
         f"{on['latency_p50_s']:.3f} / {on['latency_p95_s']:.3f} / {on['latency_p99_s']:.3f}",
         f"{off['latency_p50_s']:.3f} / {off['latency_p95_s']:.3f} / {off['latency_p99_s']:.3f}"),
        ("mean generation (s)", f"{on['generation_mean_s']:.3f}", f"{off['generation_mean_s']:.3f}"),
        ("triage embed / plan: predictor and lookup (ms)",
         f"{on['embed_ms_mean'] or 0:.1f} / {on['lookup_ms_mean'] or 0:.1f}", "-"),
        ("latent fetch on resume (ms)", f"{on['latent_fetch_ms_mean'] or 0:.1f}", "-"),
        ("throughput (jobs/s)", f"{on['throughput_jobs_per_s']:.2f}", f"{off['throughput_jobs_per_s']:.2f}"),
    ]
    lines = [f"# Live replay: {result['requests']} requests of {result['channel']}", "",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']}  ",
             f"Arrivals: {result.get('arrivals', 'closed loop')}  ",
             f"Model: {result['model']}, {result['steps']} steps per 50-step request, "
             f"K table {result['k_table']}, "
             f"embedder {result['embedder']}, resumed jobs' latents "
             f"{'kept' if result.get('admit_resumed', False) else 'not kept'}", "",
             "| | cache on | cache off |", "|---|---|---|"]
    lines += [f"| {name} | {a} | {b} |" for name, a, b in rows]
    lines += ["", f"Mean latency ratio on/off: **{result['latency_ratio_on_off']:.3f}**; "
              f"throughput ratio on/off: **{result['throughput_ratio_on_off']:.3f}**.",
              f"Route reasons (cache on): {on['route_reasons']}"]
    if intervals := result.get("intervals"):
        lines += ["", f"95% bootstrap intervals over the {intervals['requests']} requests both "
                  f"arms answered: steps saved {interval(intervals['steps_saved_frac'])}, "
                  f"latency on/off {interval(intervals['latency_ratio_on_off'])}."]
    if quality := result.get("quality"):
        def show(value: float | None) -> str:
            return "-" if value is None else f"{value:.3f}"
        lines += ["", f"Image scores ({quality['scorer']}):", "",
                  "| | cache on | cache off |", "|---|---|---|",
                  f"| all jobs | {show(quality['score_mean_cache_on'])} | "
                  f"{show(quality['score_mean_cache_off'])} |",
                  f"| the {quality['resumed_compared']} resumed requests | "
                  f"{show(quality['score_mean_resumed'])} | "
                  f"{show(quality['score_mean_resumed_same_requests_from_scratch'])} |",
                  "", f"Resumed vs the same requests from scratch: "
                  f"**{show(quality['score_ratio_resumed_vs_scratch'])}**"
                  + (" (95% bootstrap interval over the resumed requests "
                     f"{quality['score_ratio_resumed_vs_scratch_ci95']['ci95']})."
                     if (quality.get("score_ratio_resumed_vs_scratch_ci95") or {}).get("ci95")
                     else ".")]
        if all_jobs := quality.get("score_ratio_all_jobs_on_off_ci95"):
            lines += ["", f"All jobs, cache on / off (the same requests): "
                          f"{interval(all_jobs)} (95% bootstrap interval)."]
        if diversity := quality.get("reroll_diversity"):
            lines += ["", f"Re-roll diversity (mean pairwise distance between the images of "
                          f"one prompt under different seeds; {diversity['prompts']} prompts, "
                          f"{diversity['images']} images per arm):", "",
                      "| measure | cache on | cache off | on / off (95% CI) |",
                      "|---|---|---|---|"]
            for measure in ("pixels", "evaluator_features"):
                if cell := diversity.get(measure):
                    lines.append(f"| {measure} | {cell['cache_on']:.4f} | {cell['cache_off']:.4f} "
                                 f"| **{show(cell['ratio_on_off']['value'])}** "
                                 f"{cell['ratio_on_off']['ci95'] or ''} |")
    if compute := result.get("unet_compute"):
        lines += step_cache_section(compute, (result.get("quality") or {}).get("arms_vs_cache_off",
                                                                                 {}))
    return "\n".join(lines) + "\n"


ARM_TITLES = {"cache_off": "plain", "cache_on": "across-request reuse only",
              "cache_off_step": "within-request (step cache) only", "cache_on_step": "both"}


def step_cache_section(compute: dict[str, Any], quality: dict[str, Any]) -> list[str]:
    """The four arms side by side: UNet compute per image, time and quality over plain."""
    lines = ["", f"UNet compute per image and cost over plain, the {compute['requests']} "
                 f"requests every arm answered (95% bootstrap intervals; a shallow step counted "
                 f"at {compute['shallow_cost']:.3f} of a whole one, its FLOPs):", "",
             "| arm | step cache | UNet compute / steps asked | generation time / plain | "
             "latency / plain | image score / plain | re-roll diversity / plain (features) |",
             "|---|---|---|---|---|---|---|"]
    for name in sorted(compute["arms"], key=lambda arm: list(ARM_TITLES).index(arm)):
        arm = compute["arms"][name]
        score = (quality.get(name) or {}).get("score_ratio_ci95")
        diversity = ((quality.get(name) or {}).get("reroll_diversity") or {}).get(
            "evaluator_features", {}).get("ratio_on_off")
        lines.append(f"| {ARM_TITLES.get(name, name)} | {arm['step_cache']} | "
                     f"{interval(arm['compute_per_image_frac'])} | "
                     f"{interval(arm['generation_time_ratio'])} | {interval(arm['latency_ratio'])} "
                     f"| {interval(score) if score else '-'} "
                     f"| {interval(diversity) if diversity else '-'} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default=str(DEFAULT_TRACE), help="trace CSV(.gz)")
    parser.add_argument("--channel", default="W1-dream-10", help="channel to replay")
    parser.add_argument("--limit", type=int, default=2000, help="first N requests of the channel")
    parser.add_argument("--steps", type=int, default=10,
                        help="steps of a 50-step trace request (others scale alike; K scales "
                             "with the steps; 10 keeps the CPU run short)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed jobs per stack first (model and embedder load)")
    parser.add_argument("--size-divisor", type=int, default=8,
                        help="trace image side / this = job image side (at least 64)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="open loop: Poisson arrivals per second (0: closed loop, one job "
                             "in flight per stack)")
    parser.add_argument("--seed", type=int, default=0, help="arrival times seed")
    parser.add_argument("--scorer", default="",
                        help="also score every image ('scene', 'scene:WEIGHTS' or 'clip:PATH', "
                             "see quality.scoring) and write a grid of resumed vs from-scratch "
                             "images (OUT-samples.png)")
    parser.add_argument("--step-cache", default="",
                        help="also run two stacks with this T2I_STEP_CACHE (deepcache:N[:F]), "
                             "cache on and off, the first two then with the step cache off "
                             "(without it, every stack serves T2I_STEP_CACHE as set); only "
                             "for the scene or sd15-random model (their shallow-step FLOPs are "
                             "counted here)")
    parser.add_argument("--out", default="bench/results/live-replay",
                        help="output path without extension (.json and .md are written)")
    args = parser.parse_args(argv)

    base = load_settings()
    arm_specs: dict[str, tuple[bool, str | None]] = {"cache_on": (True, None),
                                                     "cache_off": (False, None)}
    shallow_cost = None
    if args.step_cache:
        from bench.step_cost import measure  # torch, for the FLOP count

        cost_model = {"scene": "scene", "sd15-random": "sd15"}.get(base.model)
        if cost_model is None:
            parser.error(f"--step-cache: T2I_MODEL={base.model} is neither scene nor sd15-random")
        try:
            StepCache.parse(args.step_cache)
        except SettingError as exc:
            parser.error(f"--step-cache: {exc}")
        shallow_cost = measure(cost_model, repeats=1)["shallow_cost_flops"]
        arm_specs = {"cache_on": (True, OFF), "cache_off": (False, OFF),
                     "cache_on_step": (True, args.step_cache),
                     "cache_off_step": (False, args.step_cache)}
    requests = list(read_trace(Path(args.trace), limit=args.limit, channel=args.channel))
    with tempfile.TemporaryDirectory(prefix="t2i-replay-") as tmp:
        arms = {name: arm_settings(base, Path(tmp) / name, cache_on, step_cache)
                for name, (cache_on, step_cache) in arm_specs.items()}
        views: dict[str, list[dict]] = {name: [] for name in arms}
        try:
            for name, config in arms.items():
                print(f"starting the {name} stack", flush=True)
                stack.up(config)
            for config in arms.values():
                warm = Client(config)
                for index in range(args.warmup):
                    warm.wait(warm.submit(f"warm-up {index}", steps=args.steps, width=64,
                                          height=64), timeout=600)
            bars = {name: tqdm(total=len(requests), desc=name, unit="job", position=i)
                    for i, name in enumerate(arms)}
            started = time.time()
            threads = [threading.Thread(target=drive, args=(Client(config), requests, args.steps,
                                                            args.size_divisor, views[name],
                                                            bars[name], args.rate, args.seed))
                       for name, config in arms.items()]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.time() - started
            images = ({name: fetch_images(Client(config), views[name])
                       for name, config in arms.items()} if args.scorer else {})
        finally:
            for config in arms.values():
                stack.down(config)

    summary = {name: summarise(arm_views) for name, arm_views in views.items()}
    embedder = cache_embedder(base.embedder, base.model)
    result = {
        "command": "python -m bench.replay_live " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.node()}: {platform.machine()}, CPU only, {len(arms)} stacks "
                   "side by side",
        "model": next(v["model"] for v in views["cache_on"] if v["state"] != "refused"),
        "channel": args.channel,
        "requests": len(requests), "steps": args.steps,
        "k_table": cache_k_table(base.k_table, base.model, embedder),
        "admit_resumed": base.cache_admit_resumed,
        "arrivals": f"Poisson {args.rate}/s" if args.rate else "closed loop",
        "embedder": embedder, "wall_s": wall,
        "step_caches": {name: next((v["step_cache"] for v in arm_views
                                    if v["state"] == "succeeded"), None)
                        for name, arm_views in views.items()},
        **summary,
        "latency_ratio_on_off": (summary["cache_on"]["latency_mean_s"]
                                 / summary["cache_off"]["latency_mean_s"]),
        "throughput_ratio_on_off": (summary["cache_on"]["throughput_jobs_per_s"]
                                    / summary["cache_off"]["throughput_jobs_per_s"]),
        "intervals": paired_intervals(views),
    }
    if shallow_cost is not None:
        result["unet_compute"] = unet_compute(views, shallow_cost)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.scorer:
        result["quality"] = score_arms(args.scorer, views, images,
                                       out.with_name(out.name + "-samples.png"))
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    from bench.plots import write_latency_cdf

    write_latency_cdf(result, out.with_name(out.name + "-latency-cdf.png"))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Add-on serving measured in process: naive against this design, on one mixed trace, side
by side in alternating rounds; and what an adapter and a ControlNet cost.

    python -m bench.addons --jobs 48 --rounds 2

Arms (the same jobs and arrival times for each):

- naive: what loading an adapter per request does (diffusers' load_lora_weights then
  fuse_lora): per LoRA job, fetch the file, parse it, merge it into the UNet's weights, run,
  take it out again; one job at a time (merged weights serve one adapter); a ControlNet runs
  inline, before each UNet call;
- resident: GPU workers' way (workers.lora, workers.controlnet): adapters kept resident
  (LRU), applied per row by hooks, a missing one fetched in the background while the job's
  first T2I_LORA_FROM of steps run; the ControlNet on its own thread beside the UNet's down
  blocks; batch 1;
- resident, batch B: the same behind the step-level batcher, jobs with different adapters,
  control images (or none) in one UNet call.

The trace: the toy trace's prompts, --lora-share of jobs carrying one LoRA drawn from
--adapters adapters with Zipf(--zipf) popularity (random weights of --rank on the served
model's attention layers: cost depends on size, not on what was learnt; quality.addons
measures the trained ones), and, drawn independently, --control-share with the scene
model's layout ControlNet and one of 8 layout maps. Adapter files and control images live
on a real S3 server (SeaweedFS, started here on free ports in a temporary directory) and
each arm starts with no adapter resident. Arrivals are Poisson at each of --loads times the
naive arm's measured capacity. Equal images: at T2I_LORA_FROM=0 the resident arm's images
are compared with the naive arm's.

Adapter costs (--cost-models: 'scene', and 'sd15' for SD 1.5's UNet architecture with a
rank-64 adapter, the common size): cold load (S3 fetch and parse), warm (resident), the
naive swap (merge one adapter out and another in; a merged call does the plain call's
arithmetic), and a UNet call (2 rows) with the hooks idle, with one adapter on both rows and
with two adapters (one per row), over the same call on an unhooked copy of the UNet; and a
UNet call with a ControlNet
(the scene model's trained one; SD 1.5's shape with random weights) inline and beside the
UNet, over the call without, with inline also given twice the torch threads. Costs are timed
round-robin (--repeats rounds), so drift falls on every variant alike.
Writes OUT.json and OUT.png.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from core.addons import ControlRef, LoraRef, blob_key, control_key
from core.jobs import JobRequest
from core.objectstore import ObjectStore
from core.settings import Settings, ensure_secrets, load_settings
from infra import servers
from infra.ports import free_port
from quality.controlnet import SCENE_CONTROLNET_DIR, layout_map
from quality.evaluator import png_pixels
from quality.placement import png
from quality.scenes import sample_scene
from quality.toy_trace import Behaviour, toy_trace
from workers.batcher import BatchingEngine
from workers.builtin_models import SCENE_MODEL_DIR, SD15_UNET
from workers.controlnet import ControlBranch, ControlConfig, ControlledRows
from workers.engine import Engine
from workers.lora import (
    AdapterCache,
    AdapterConfig,
    LoraLayer,
    adapter_file,
    lora_targets,
    merged,
    parse_adapter,
)
from workers.step_cache import SplitUNet


def quiet(step: int, total: int) -> None:
    pass


def random_lora(targets: dict[str, tuple[int, int]], rank: int, seed: int,
                std: float = 0.05) -> bytes:
    """A LoRA file of seeded normal weights (times ``std``) on ``targets``: what an adapter
    costs does not depend on what it learnt."""
    generator = torch.Generator().manual_seed(seed)
    return adapter_file({
        module: (torch.randn(rank, in_features, generator=generator) * std,
                 torch.randn(out_features, rank, generator=generator) * std)
        for module, (out_features, in_features) in targets.items()})


def workload(count: int, steps: int, size: int, refs: list[LoraRef], share: float,
             zipf: float, controls: list[ControlRef], control_share: float,
             seed: int) -> list[JobRequest]:
    """The toy trace's prompts; a LoRA (Zipf popularity) on ``share`` of the jobs and, drawn
    independently, a ControlNet image on ``control_share``."""
    rows = toy_trace(count, users=4, behaviour=Behaviour(), guidance=4.0, seed=seed)
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(refs) + 1) ** zipf
    weights /= weights.sum()
    jobs = []
    for row in rows:
        loras = (refs[rng.choice(len(refs), p=weights)],) if rng.random() < share else ()
        control = controls[rng.integers(len(controls))] if rng.random() < control_share \
            else None
        jobs.append(JobRequest(str(row["prompt"]), "", steps, 4.0, int(str(row["seed"])), size,
                               size, loras, control))
    return jobs


def naive_job(engine: Engine, objects: ObjectStore, request: JobRequest) -> bytes:
    """Fetch, parse and merge the job's adapters, run it (its ControlNet inline, as the
    engine given runs it), take them out."""
    adapters = tuple((parse_adapter(ref.digest, objects.get(blob_key(ref.digest)),
                                    engine.device, engine.pipe.unet.dtype), ref.scale)
                     for ref in request.loras)
    with merged(engine.pipe.unet, adapters):
        return engine.generate(dataclasses.replace(request, loras=()), quiet).image_png


def run_arm(arm: str, plain: Engine, design: Engine, objects: ObjectStore, batch: int,
            jobs: list[JobRequest], arrivals: list[float]) -> dict[str, Any]:
    latencies = [0.0] * len(jobs)
    waits = [0.0] * len(jobs)
    images: list[bytes] = [b""] * len(jobs)
    origin = time.perf_counter() + 0.05
    if arm == "naive":
        for index, request in enumerate(jobs):
            time.sleep(max(0.0, origin + arrivals[index] - time.perf_counter()))
            images[index] = naive_job(plain, objects, request)
            latencies[index] = time.perf_counter() - origin - arrivals[index]
    else:
        assert design.adapters is not None
        design.adapters.close()
        design.adapters = AdapterCache(objects.get, design.device, design.pipe.unet.dtype,
                                       design.adapters.budget_bytes)   # none resident
        batching = BatchingEngine(design, batch)

        def one(index: int) -> None:
            time.sleep(max(0.0, origin + arrivals[index] - time.perf_counter()))
            result = batching.generate(jobs[index], quiet)
            latencies[index] = time.perf_counter() - origin - arrivals[index]
            waits[index] = result.adapter_wait_s
            images[index] = result.image_png

        with ThreadPoolExecutor(len(jobs)) as threads:
            list(threads.map(one, range(len(jobs))))
        batching.close()
    finished = max(arrivals[i] + latencies[i] for i in range(len(jobs)))
    values = np.array(latencies)
    return {"arm": arm, "batch": batch, "jobs": len(jobs),
            "throughput_jobs_s": len(jobs) / finished,
            "latency_mean_s": float(values.mean()),
            "latency_p50_s": float(np.percentile(values, 50)),
            "latency_p99_s": float(np.percentile(values, 99)),
            "adapter_wait_mean_ms": 1e3 * float(np.mean(waits)),
            "images": images}


def cost_unet(model: str) -> tuple[Any, int, int]:
    """(the UNet, its latent side, the pixel side) of a --cost-models name."""
    from diffusers import UNet2DConditionModel

    if model == "scene":
        return UNet2DConditionModel.from_pretrained(SCENE_MODEL_DIR / "unet").eval().float(), 16, 64
    torch.manual_seed(0)
    return UNet2DConditionModel(in_channels=4, out_channels=4, **SD15_UNET).eval(), 64, 512


def probe(unet: Any, side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A guided job's two rows at mid schedule: (sample, timesteps, text)."""
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, side, side, generator=generator), torch.tensor([500.0, 500.0]),
            torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator))


def interleaved_s(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """The median seconds of each call, timed round-robin (one of each per round, after one
    untimed round), so the machine's drift falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_number in range(repeats + 1):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            if round_number:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


@torch.inference_mode()
def adapter_costs(model: str, objects: ObjectStore, repeats: int) -> dict[str, Any]:
    unet, side, _ = cost_unet(model)
    rank = 8 if model == "scene" else 64
    files = [random_lora(lora_targets(unet), rank, seed) for seed in (1, 2)]
    digests = [hashlib.sha256(data).hexdigest() for data in files]
    for digest, data in zip(digests, files):
        objects.put(blob_key(digest), data)

    def cold() -> Any:
        cache = AdapterCache(objects.get, torch.device("cpu"), torch.float32, 2**34)
        adapter = cache.load(digests[0]).result()
        cache.close()
        return adapter

    first = cold()
    second = parse_adapter(digests[1], files[1], torch.device("cpu"), torch.float32)
    warm_cache = AdapterCache(objects.get, torch.device("cpu"), torch.float32, 2**34)
    warm_cache.load(digests[0]).result()

    def swap() -> None:
        with merged(unet, ((first, 1.0),)):
            pass
        with merged(unet, ((second, 1.0),)):
            pass

    loads = interleaved_s({"cold": cold, "warm": lambda: warm_cache.load(digests[0]).result(),
                           "swap": swap}, repeats)
    warm_cache.close()
    sample, timesteps, text = probe(unet, side)
    unhooked = copy.deepcopy(unet)       # the same weights, never hooked: the baseline
    layer = LoraLayer(unet)

    def hooked(rows: list[Any]) -> Callable[[], Any]:
        def run() -> Any:
            with layer.applied(rows):
                return unet(sample, timesteps, encoder_hidden_states=text).sample
        return run

    calls = interleaved_s({
        "plain": lambda: unhooked(sample, timesteps, encoder_hidden_states=text).sample,
        "idle": hooked([]), "one": hooked([((first, 1.0),)] * 2),
        "two": hooked([((first, 1.0),), ((second, 1.0),)])}, repeats)
    return {"model": model, "rank": rank, "adapted_layers": len(first.pairs),
            "file_mb": round(len(files[0]) / 2**20, 3), "latent": [side, side], "rows": 2,
            "cold_load_ms": round(1e3 * loads["cold"], 2),
            "warm_load_ms": round(1e3 * loads["warm"], 4),
            "naive_swap_ms": round(1e3 * loads["swap"], 2),
            "unet_call_ms": round(1e3 * calls["plain"], 2),
            "idle_hooks_over_plain": round(calls["idle"] / calls["plain"], 4),
            "hooked_call_over_plain": round(calls["one"] / calls["plain"], 4),
            "hooked_two_adapters_over_plain": round(calls["two"] / calls["plain"], 4)}


@torch.inference_mode()
def control_costs(model: str, repeats: int) -> dict[str, Any]:
    """A UNet call (2 rows) with a ControlNet inline and beside the UNet, over the call
    without; inline also with twice the torch threads (the cores the beside thread uses)."""
    from diffusers import ControlNetModel

    unet, side, pixels_side = cost_unet(model)
    controlnet = ControlNetModel.from_pretrained(SCENE_CONTROLNET_DIR) if model == "scene" \
        else ControlNetModel.from_unet(unet)   # SD 1.5's shape, random weights: its cost
    controlnet = controlnet.eval().float()
    split = SplitUNet(unet)
    sample, timesteps, text = probe(unet, side)
    image = torch.rand(1, 3, pixels_side, pixels_side, generator=torch.Generator().manual_seed(1))
    controlled: ControlledRows = [([0, 1], "c", image, 1.0)]
    whole = torch.ones(2, dtype=torch.bool)
    inline, beside = ControlBranch({"c": controlnet}, False), ControlBranch({"c": controlnet}, True)

    def plain() -> Any:
        return split(sample, timesteps, text, whole, None)

    def run(branch: ControlBranch) -> Callable[[], Any]:
        return lambda: split(sample, timesteps, text, whole, None,
                             branch.start(sample, timesteps, text, controlled))

    threads = torch.get_num_threads()
    narrow = interleaved_s({"plain": plain, "inline": run(inline), "beside": run(beside)},
                           repeats)
    torch.set_num_threads(2 * threads)
    try:
        wide = interleaved_s({"plain": plain, "inline": run(inline)}, repeats)
    finally:
        torch.set_num_threads(threads)
    beside.close()
    base = narrow["plain"]
    return {"model": model, "latent": [side, side], "rows": 2, "torch_threads": threads,
            "controlnet_parameters_m": round(sum(p.numel() for p in controlnet.parameters())
                                             / 1e6, 1),
            "unet_call_ms": round(1e3 * base, 2),
            "inline_over_plain": round(narrow["inline"] / base, 4),
            "beside_over_plain": round(narrow["beside"] / base, 4),
            "plain_with_twice_the_threads_over_plain": round(wide["plain"] / base, 4),
            "inline_with_twice_the_threads_over_plain": round(wide["inline"] / base, 4)}


def s3_settings(state_dir: Path) -> Settings:
    return ensure_secrets(dataclasses.replace(
        load_settings({}, read_secrets=False), state_dir=str(state_dir), s3_bucket="bench-addons",
        s3_endpoint=f"127.0.0.1:{free_port()}", s3_master_port=free_port()))


def main(argv: list[str] | None = None) -> int:
    class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    parser.add_argument("--model", default="scene", help="a T2I_MODEL value")
    parser.add_argument("--jobs", type=int, default=48, help="jobs per configuration")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--adapters", type=int, default=8, help="distinct LoRAs in the trace")
    parser.add_argument("--rank", type=int, default=8, help="their rank")
    parser.add_argument("--lora-share", type=float, default=0.7, help="jobs with a LoRA")
    parser.add_argument("--zipf", type=float, default=1.1, help="popularity skew")
    parser.add_argument("--control-share", type=float, default=0.2,
                        help="jobs with a ControlNet (layout maps of scene-world scenes)")
    parser.add_argument("--controlnet", default=str(SCENE_CONTROLNET_DIR),
                        help="the ControlNet the trace uses (the scene model's layout one)")
    parser.add_argument("--lora-from", type=float, default=load_settings({}).lora_from,
                        help="T2I_LORA_FROM of the resident arms")
    parser.add_argument("--batch", type=int, default=8, help="the batching arm's batch")
    parser.add_argument("--loads", default="0.8,2.0",
                        help="arrival rates, in multiples of the naive arm's capacity")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument("--cost-models", default="scene,sd15", help="scene, sd15 ('' for none)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per adapter cost")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/addons-cpu",
                        help="output path without suffix (.json and .png)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-addons-") as temp:
        config = s3_settings(Path(temp))
        with servers.running(servers.s3(config, Path(temp) / "s3"), log_dir=Path(temp)):
            result = measure(args, ObjectStore.from_settings(config))
    result["command"] = "python -m bench.addons " + " ".join(
        argv if argv is not None else sys.argv[1:])
    result["seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    for load, arms in result["by_load"].items():
        for arm, cell in arms.items():
            print(f"load {load}x {arm:20s}: {cell['throughput_jobs_s']:.2f} jobs/s, latency "
                  f"mean {cell['latency_mean_s']:.2f} p50 {cell['latency_p50_s']:.2f} "
                  f"p99 {cell['latency_p99_s']:.2f} s")
    for row in result["adapter_costs"] + result["controlnet_costs"]:
        print(json.dumps(row))
    print(f"images, resident at T2I_LORA_FROM=0 vs naive: max pixel difference "
          f"{result['equal_images']['max_pixel_difference']}; written {out.with_suffix('.json')}")
    return 0


def measure(args: argparse.Namespace, objects: ObjectStore) -> dict[str, Any]:
    objects.ensure_bucket()
    cost_models = [m for m in args.cost_models.split(",") if m]
    costs = [adapter_costs(model, objects, args.repeats)
             for model in tqdm(cost_models, desc="adapter costs")]
    control = [control_costs(model, args.repeats)
               for model in tqdm(cost_models, desc="ControlNet costs")]
    models = load_settings().state_path / "models"
    served = {"layout": args.controlnet}
    plain = Engine.load(args.model, "ddim", "cpu", models, True,
                        controls=ControlConfig(objects.get, served, parallel=False))
    design = Engine(plain.pipe, "ddim", plain.device, plain.label,
                    adapters=AdapterConfig(objects.get, 2**30, args.lora_from),
                    controls=ControlConfig(objects.get, served, parallel=True))
    controls = []
    for index in range(8):
        scene = sample_scene(random.Random(index))
        layout = png(layout_map(scene, index))
        digest = hashlib.sha256(layout).hexdigest()
        objects.put(control_key(digest), layout)
        controls.append(ControlRef("layout", 1.0, digest))
    refs = []
    for index in range(args.adapters):
        data = random_lora(lora_targets(plain.pipe.unet), args.rank, 100 + index)
        digest = hashlib.sha256(data).hexdigest()
        objects.put(blob_key(digest), data)
        refs.append(LoraRef(f"style-{index}", 1.0, digest))
    jobs = workload(args.jobs, args.steps, args.size, refs, args.lora_share, args.zipf,
                    controls, args.control_share, args.seed)
    probes = jobs[:8]
    begun = time.perf_counter()
    naive_images = [naive_job(plain, objects, request) for request in probes]
    capacity = len(probes) / (time.perf_counter() - begun)
    design.lora_from = 0.0
    same = [design.generate(request, quiet).image_png for request in probes]
    design.lora_from = args.lora_from
    difference = max(int(np.abs(png_pixels(a).astype(np.int16) - png_pixels(b)).max())
                     for a, b in zip(naive_images, same))
    arms = [("naive", 1), ("resident", 1), (f"resident, batch {args.batch}", args.batch)]
    loads = [float(x) for x in args.loads.split(",")]
    rows = []
    with tqdm(total=args.rounds * len(loads) * len(arms), desc="configurations") as bar:
        for round_number in range(args.rounds):
            for load in loads:
                gaps = np.random.default_rng(args.seed + round_number).exponential(
                    1.0 / (load * capacity), size=len(jobs))
                arrivals = list(np.cumsum(gaps) - gaps[0])
                for arm, batch in arms:
                    row = run_arm(arm, plain, design, objects, batch, jobs, arrivals)
                    row.pop("images")
                    rows.append({"round": round_number, "load": load, **row})
                    bar.update()
    by_load: dict[str, dict[str, dict[str, float]]] = {}
    for load in loads:
        by_load[str(load)] = {}
        for arm, _ in arms:
            mine = [r for r in rows if r["load"] == load and r["arm"] == arm]
            by_load[str(load)][arm] = {key: float(np.mean([r[key] for r in mine])) for key in (
                "throughput_jobs_s", "latency_mean_s", "latency_p50_s", "latency_p99_s",
                "adapter_wait_mean_ms")}
    ratios = {str(load): {arm: {
        "throughput_over_naive": float(np.mean([
            r["throughput_jobs_s"] / n["throughput_jobs_s"] for r, n in zip(
                [r for r in rows if r["load"] == load and r["arm"] == arm],
                [r for r in rows if r["load"] == load and r["arm"] == "naive"])])),
        "mean_latency_over_naive": float(np.mean([
            r["latency_mean_s"] / n["latency_mean_s"] for r, n in zip(
                [r for r in rows if r["load"] == load and r["arm"] == arm],
                [r for r in rows if r["load"] == load and r["arm"] == "naive"])]))}
        for arm, _ in arms[1:]} for load in loads}
    return {"machine": f"{platform.node()}: {platform.machine()}, CPU, "
                       f"{torch.get_num_threads()} torch threads",
            "model": plain.label, "steps": args.steps, "size": args.size, "jobs": args.jobs,
            "lora_jobs": sum(bool(j.loras) for j in jobs), "adapters": args.adapters,
            "rank": args.rank, "zipf": args.zipf, "lora_from": args.lora_from,
            "naive_capacity_jobs_s": capacity, "loads": loads, "rounds": args.rounds,
            "equal_images": {"jobs": len(probes), "max_pixel_difference": difference},
            "control_jobs": sum(j.controlnet is not None for j in jobs),
            "adapter_costs": costs, "controlnet_costs": control, "by_load": by_load,
            "ratios_by_load": ratios, "rows": rows}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = list(result["by_load"])
    arms = list(result["by_load"][loads[0]])
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(arms)
    for offset, arm in enumerate(arms):
        xs = np.arange(len(loads)) + width * (offset - (len(arms) - 1) / 2)
        axes[0].bar(xs, [result["by_load"][load][arm]["throughput_jobs_s"] for load in loads],
                    width, label=arm)
        axes[1].bar(xs, [result["by_load"][load][arm]["latency_mean_s"] for load in loads],
                    width, label=arm)
    for axis, label in zip(axes, ("throughput (jobs/s)", "mean latency (s)")):
        axis.set_xticks(range(len(loads)), [f"{load}x naive capacity" for load in loads])
        axis.set_ylabel(label)
        axis.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    figure.suptitle(f"{result['model']}: {result['jobs']} jobs, {result['lora_jobs']} with a "
                    f"LoRA of {result['adapters']}, {result['control_jobs']} with a ControlNet; "
                    f"{result['machine']}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())

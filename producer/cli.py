"""``t2i``: submit and follow text-to-image jobs from the shell, and run the demo.

Talks to Redis (and S3 for images) as configured by the T2I_* environment variables;
`t2i config` lists them with their defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from core import settings
from core.errors import InvalidRequest, T2IError
from core.trace import DEFAULT_TRACE, read_trace
from producer.api_client import ApiClient
from producer.client import Client
from quality.toy_trace import Behaviour, toy_trace


def _params(args: argparse.Namespace) -> dict[str, Any]:
    names = ("negative_prompt", "steps", "guidance", "seed", "width", "height")
    params = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.lora:
        params["loras"] = [_lora_use(text) for text in args.lora]
    return params


def _lora_use(text: str) -> dict[str, Any]:
    """NAME or NAME:SCALE (the scale is checked with the rest of the request)."""
    name, _, scale = text.partition(":")
    try:
        return {"name": name, "scale": float(scale)} if scale else {"name": name}
    except ValueError:
        raise InvalidRequest("--lora", f"{text!r}: the scale is not a number") from None


class Jobs(Protocol):
    """What the job commands call: the local stack's Client (Redis), or ApiClient (a
    deployment's HTTP API, with --api-url)."""

    def submit(self, prompt: str, **params: Any) -> str: ...
    def status(self, job_id: str) -> dict[str, Any]: ...
    def wait(self, job_id: str, timeout: float = 300.0, *,
             watch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]: ...
    def result(self, job_id: str) -> bytes: ...
    def cancel(self, job_id: str) -> dict[str, Any]: ...
    def upload_lora(self, name: str, data: bytes) -> dict[str, Any]: ...
    def list_loras(self) -> list[dict[str, Any]]: ...
    def delete_lora(self, name: str) -> None: ...


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _route(view: dict[str, Any]) -> str:
    """How the job runs once triage decided ("resume K 10", "full", "exact"); "" before."""
    cache = view.get("cache") or {}
    if cache.get("route") == "resume":
        return f"resume K {cache.get('k')}"
    return str(cache.get("route") or "")


def _how(view: dict[str, Any]) -> str:
    """The state, and the route once there is one: "generating, resume K 10"."""
    route = _route(view)
    return f"{view['state']}, {route}" if route else view["state"]


def _summary(view: dict[str, Any]) -> str:
    timings, progress = view.get("timings") or {}, view["progress"]
    took = ""
    if timings.get("finished_at") and timings.get("submitted_at"):
        took = f" in {timings['finished_at'] - timings['submitted_at']:.1f} s"
    line = f"job {view['id']} {view['state']}{took}: {_route(view) or view['state']}"
    line += f", {progress['step']}/{progress['total']} steps"
    if view["state"] == "succeeded":
        return line + f"\n  image: t2i result {view['id']}  (or {view.get('image_url')})"
    return line + (f"\n  error: {view['error']}" if view.get("error") else "")


def _follow(client: Jobs, job_id: str, timeout: float, as_json: bool) -> int:
    """Wait with a progress bar on stderr (steps, state, route and K), then print a summary,
    or the whole record with --json."""
    with tqdm(desc=job_id[:8], unit="step", leave=False) as bar:
        def show(view: dict[str, Any]) -> None:
            progress = view["progress"]
            if progress["total"]:
                bar.total, bar.n = progress["total"], progress["step"]
            bar.set_postfix_str(_how(view), refresh=False)
            bar.refresh()

        view = client.wait(job_id, timeout=timeout, watch=show)
    if as_json:
        _print_json(view)
    else:
        print(_summary(view))
    return 0 if view["state"] == "succeeded" else 1


def cmd_submit(client: Jobs, args: argparse.Namespace) -> int:
    job_id = client.submit(args.prompt, **_params(args))
    if not args.wait:
        print(job_id)
        return 0
    return _follow(client, job_id, args.timeout, args.json)


def cmd_status(client: Jobs, args: argparse.Namespace) -> int:
    _print_json(client.status(args.job_id))
    return 0


def cmd_wait(client: Jobs, args: argparse.Namespace) -> int:
    return _follow(client, args.job_id, args.timeout, args.json)


def cmd_result(client: Jobs, args: argparse.Namespace) -> int:
    out = Path(args.output or f"{args.job_id}.png")
    out.write_bytes(client.result(args.job_id))
    print(out)
    return 0


def cmd_cancel(client: Jobs, args: argparse.Namespace) -> int:
    _print_json(client.cancel(args.job_id))
    return 0


def cmd_loras(client: Jobs, args: argparse.Namespace) -> int:
    if args.action != "list" and not args.name:
        raise InvalidRequest("name", f"loras {args.action} needs the LoRA's name")
    if args.action == "upload":
        if not args.file:
            raise InvalidRequest("file", "loras upload NAME FILE: give the .safetensors file")
        _print_json(client.upload_lora(args.name, Path(args.file).read_bytes()))
    elif args.action == "delete":
        client.delete_lora(args.name)
        print(f"deleted {args.name}")
    else:
        for entry in client.list_loras():
            print(f"{entry['name']}\trank {entry['rank']}\t{entry['bytes']} bytes\t"
                  f"{entry['digest'][:12]}")
    return 0


def cmd_config(_: Client, __: argparse.Namespace) -> int:
    current = settings.to_environ(settings.load_settings())
    hidden = settings.secret_variables()
    for env, default, doc in settings.describe():
        now = "(secret, set)" if env in hidden else repr(current[env])
        print(f"{env:26} default {default:28} now {now}\n{'':26} {doc}")
    return 0


def _seconds(view: dict[str, Any], start: str, end: str) -> float | None:
    timings = view["timings"]
    if timings.get(start) is None or timings.get(end) is None:
        return None
    return timings[end] - timings[start]


def demo_jobs(source: str, count: int, steps: int, size: int | None) -> list[dict[str, Any]]:
    """The demo's jobs: a scene-world session (one user editing and re-rolling prompts, for
    the scene model) or the first prompts of a trace."""
    if source == "scene":
        rows = toy_trace(count, users=1, behaviour=Behaviour(), guidance=4.0, seed=7)
        return [{"prompt": row["prompt"], "seed": row["seed"], "steps": steps,
                 "guidance": row["cfg"], "width": size or 64, "height": size or 64}
                for row in rows]
    return [{"prompt": req.prompt, "seed": req.seed, "steps": steps, "width": size or 256,
             "height": size or 256} for req in read_trace(Path(source), limit=count)]


def cmd_demo(client: Client, args: argparse.Namespace) -> int:
    """Run the demo's jobs one after another (so each can reuse the ones before it), print a
    table and write the images and a contact sheet."""
    out_dir = Path(args.output or client.settings.state_path / "demo")
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs, views = [], []
    for params in tqdm(demo_jobs(args.trace, args.count, args.steps, args.size), desc="jobs",
                       unit="job"):
        jobs.append((params["prompt"], client.submit(**params)))
        views.append(client.wait(jobs[-1][1], timeout=args.timeout))
    print(f"\nmodel: {views[0]['model'] if views else '-'}")
    print(f"{'job':10} {'state':10} {'route':24} {'total s':>8} {'gen s':>7}  image / prompt")
    for (prompt, job_id), view in zip(jobs, views):
        image = ""
        if view["state"] == "succeeded":
            path = out_dir / f"{job_id}.png"
            path.write_bytes(client.result(job_id))
            image = str(path)
        total = _seconds(view, "submitted_at", "finished_at")
        gen = _seconds(view, "generation_started_at", "generation_finished_at")
        cache = view["cache"] or {}
        route = f"{cache.get('route') or '-'} ({cache.get('reason') or '-'}"
        route += f", K={cache['k']})" if cache.get("k") else ")"
        print(f"{job_id[:8]:10} {view['state']:10} {route:24} "
              f"{total or 0:8.2f} {gen or 0:7.2f}  {image or view['error']}\n"
              f"{'':64}{prompt[:70]!r}")
    totals = [t for v in views if (t := _seconds(v, "submitted_at", "finished_at")) is not None]
    if totals:
        print(f"\n{len(views)} jobs, median end-to-end {statistics.median(totals):.2f}s; "
              f"images in {out_dir}")
    finished = [path for _, job_id in jobs if (path := out_dir / f"{job_id}.png").exists()]
    if sheet := contact_sheet(finished):
        sheet.save(out_dir / "sheet.png")
        print(f"contact sheet (in submission order, left to right): {out_dir / 'sheet.png'}")
    return 0 if all(v["state"] == "succeeded" for v in views) else 1


def contact_sheet(paths: list[Path], columns: int = 6):
    """The images side by side, ``columns`` per row, each scaled to 128 px."""
    from PIL import Image

    if not paths:
        return None
    tiles = [Image.open(path).convert("RGB").resize((128, 128), Image.Resampling.NEAREST) for path in paths]
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (128 * min(columns, len(tiles)), 128 * rows), "white")
    for index, tile in enumerate(tiles):
        sheet.paste(tile, (128 * (index % columns), 128 * (index // columns)))
    return sheet


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2i", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api-url", default=os.environ.get("T2I_API_URL", ""),
                        help="a deployment's HTTP API (e.g. https://t2i.example.com), instead "
                             "of the local stack's Redis (env T2I_API_URL)")
    parser.add_argument("--api-key", default=os.environ.get("T2I_API_KEY", ""),
                        help="its API key (env T2I_API_KEY)")
    sub = parser.add_subparsers(dest="command", required=True)

    submit = sub.add_parser("submit", help="submit a prompt; prints the job id")
    submit.add_argument("prompt")
    submit.add_argument("--negative-prompt", dest="negative_prompt")
    submit.add_argument("--steps", type=int, help="denoising steps (default T2I_DEFAULT_STEPS)")
    submit.add_argument("--guidance", type=float, help="guidance scale")
    submit.add_argument("--seed", type=int, help="seed (random when omitted)")
    submit.add_argument("--width", type=int, help="multiple of 8")
    submit.add_argument("--height", type=int, help="multiple of 8")
    submit.add_argument("--lora", action="append", metavar="NAME[:SCALE]",
                        help="apply an uploaded LoRA (repeat for several; scale -2..2, "
                             "default 1)")
    submit.add_argument("--wait", action="store_true",
                        help="wait with a progress bar (steps, route, K), then print a summary")
    submit.add_argument("--json", action="store_true",
                        help="with --wait: print the final record as JSON instead")
    submit.add_argument("--timeout", type=float, default=600.0, help="seconds to wait")
    submit.set_defaults(run=cmd_submit)

    for name, run, helptext in (("status", cmd_status, "print a job's record"),
                                ("wait", cmd_wait, "wait until a job finishes, with a "
                                                   "progress bar"),
                                ("cancel", cmd_cancel, "cancel a job"),
                                ("result", cmd_result, "save a job's PNG")):
        command = sub.add_parser(name, help=helptext)
        command.add_argument("job_id")
        command.set_defaults(run=run)
        if name == "wait":
            command.add_argument("--timeout", type=float, default=600.0, help="seconds to wait")
            command.add_argument("--json", action="store_true",
                                 help="print the final record as JSON, not a summary")
        if name == "result":
            command.add_argument("-o", "--output", help="file to write (default JOB_ID.png)")

    loras = sub.add_parser("loras", help="this tenant's LoRAs: list, upload NAME FILE, "
                                         "delete NAME")
    loras.add_argument("action", choices=("list", "upload", "delete"), nargs="?",
                       default="list")
    loras.add_argument("name", nargs="?", help="the LoRA's name (upload, delete)")
    loras.add_argument("file", nargs="?", help="upload: the .safetensors file (UNet "
                                               "attention LoRA, diffusers' tensor names)")
    loras.set_defaults(run=cmd_loras)

    demo = sub.add_parser("demo", help="run a short session of prompts and report")
    demo.add_argument("--trace", default="scene",
                      help="'scene': one user editing and re-rolling scene-world prompts (for "
                           "the scene model, T2I_MODEL=scene); or a trace CSV(.gz) path: its "
                           f"first prompts (e.g. {DEFAULT_TRACE})")
    demo.add_argument("-n", "--count", type=int, default=12, help="number of prompts")
    demo.add_argument("--size", type=int,
                      help="width and height (default 64 for scene prompts, 256 for a trace)")
    demo.add_argument("--steps", type=int, default=25, help="denoising steps")
    demo.add_argument("--timeout", type=float, default=900.0, help="seconds to wait per job")
    demo.add_argument("-o", "--output", help="directory for the PNGs (default STATE_DIR/demo)")
    demo.set_defaults(run=cmd_demo)

    sub.add_parser("config", help="list the environment variables and their values"
                   ).set_defaults(run=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.api_url and args.run is cmd_demo:
        parser.error("demo runs on the local stack: leave out --api-url")
    try:
        return args.run(ApiClient(args.api_url, args.api_key) if args.api_url else Client(),
                        args)
    except T2IError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`t2i status ID | head`): stop quietly, as a Unix tool killed
        # by SIGPIPE does, and keep Python from failing again as it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE

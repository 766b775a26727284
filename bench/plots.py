"""Plots and a Markdown table for replay results (PNG files next to the JSON).

    python -m bench.plots bench/results/replay-policies-10k.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from PIL import Image, ImageDraw

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def _budget_label(row: dict) -> str:
    return str(row["budget_prompts"]) if row["budget_prompts"] else "unbounded"


KINDS = ("exact", "re-roll", "near edit", "chained")
MARKERS = ("o", "s", "^", "D", "v", "P")
DASHES = ("-", "--", ":", "-.")


def markdown_table(rows: list[dict]) -> str:
    """One line per configuration; steps saved split by what the hits reused (of all
    requested steps, so the four add up to the total)."""
    lines = ["| policy | budget (prompts) | embedder | K table | reuse rules | resumed jobs' "
             "latents | hit rate | steps saved | " + " | ".join(f"of which {k}" for k in KINDS)
             + " | mean K on resume |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(KINDS) + "---|"]
    for r in rows:
        kept = "kept" if r.get("admit_resumed") else "not kept"
        split = " | ".join(f"{r['steps_saved_frac_by_kind'].get(k, 0.0):.1%}" for k in KINDS)
        lines.append(f"| {r['policy']} | {_budget_label(r)} | {r['embedder']} | {r['k_table']} | "
                     f"{r['rules']} | {kept} | {r['hit_rate']:.1%} | {r['steps_saved_frac']:.1%} | "
                     f"{split} | {r['mean_k_on_hit']:.1f} |")
    return "\n".join(lines) + "\n"


def write_sweep_plots(rows: list[dict], out: Path) -> list[Path]:
    """Steps saved vs budget per policy; K distribution and hit rate over time of the
    largest-budget row of the first policy."""
    written = []
    budgets = sorted({r["budget_prompts"] or 0 for r in rows}, key=lambda b: b or float("inf"))
    labels = [str(b) if b else "unbounded" for b in budgets]
    figure, axis = plt.subplots(figsize=(7, 4))
    def line_of(row: dict) -> tuple[str, str]:
        return row["policy"], row.get("rules", "old")  # results from before the rules: old

    lines = list(dict.fromkeys(line_of(r) for r in rows))
    for index, (policy, rules) in enumerate(lines):
        by_budget = {r["budget_prompts"] or 0: r["steps_saved_frac"] for r in rows
                     if line_of(r) == (policy, rules)}
        # Policies often tie (LCBFU and LFU at most budgets): each line its own marker and
        # dash, drawn smaller than the one before, so a tied line shows inside the other.
        axis.plot(labels, [100 * by_budget.get(b, float("nan")) for b in budgets],
                  marker=MARKERS[index % len(MARKERS)], markersize=11 - 2 * (index % 4),
                  linestyle=DASHES[index % len(DASHES)], linewidth=2.5 - 0.4 * (index % 4),
                  markerfacecolor="none" if index % 2 else None,
                  label=f"{policy}, {rules} rules")
    axis.set_xlabel("cache budget (prompts' worth of items)")
    axis.set_ylabel("denoising steps saved (%)")
    axis.set_title(f"Steps saved by policy and budget ({rows[0]['requests']} requests)")
    axis.legend()
    axis.grid(alpha=0.3)
    written.append(out.with_name(out.name + "-steps-saved.png"))
    figure.tight_layout()
    figure.savefig(written[-1], dpi=110)
    plt.close(figure)

    best = max((r for r in rows if r["policy"] == rows[0]["policy"]),
               key=lambda r: r["budget_prompts"] or float("inf"))
    figure, (k_axis, time_axis) = plt.subplots(1, 2, figsize=(11, 4))
    ks = sorted(best["k_histogram"], key=int)
    # numeric positions: matplotlib picks ticks that do not overlap, however many Ks there are
    k_axis.bar([int(k) for k in ks], [best["k_histogram"][k] for k in ks], width=0.8)
    k_axis.set_xlabel("K on hits (of 50)")
    k_axis.set_ylabel("hits")
    k_axis.set_title(f"K distribution ({best['policy']}, {_budget_label(best)})")
    window = best["hit_rate_window"]
    time_axis.plot([window * (i + 1) for i in range(len(best["hit_rate_over_time"]))],
                   [100 * h for h in best["hit_rate_over_time"]])
    time_axis.set_xlabel("requests")
    time_axis.set_ylabel(f"hit rate per {window} requests (%)")
    time_axis.set_title("Hit rate over time")
    time_axis.grid(alpha=0.3)
    written.append(out.with_name(out.name + "-k-and-hits.png"))
    figure.tight_layout()
    figure.savefig(written[-1], dpi=110)
    plt.close(figure)
    return written


def write_similarity_plot(similarities: list[float], table_thresholds: list[float],
                          embedder: str, out: Path) -> Path:
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.hist(similarities, bins=100, range=(0, 1))
    for threshold in table_thresholds:
        axis.axvline(threshold, color="red", alpha=0.4, linestyle="--")
    axis.set_xlabel(f"top-1 cosine similarity to an earlier request ({embedder})")
    axis.set_ylabel("requests")
    axis.set_title("Similarity profile (dashed: K table thresholds)")
    path = out.with_name(out.name + "-similarity.png")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_latency_cdf(result: dict[str, Any], path: Path) -> None:
    """End-to-end latency CDFs of the two arms, side by side."""
    figure, axis = plt.subplots(figsize=(7, 4))
    for arm, style in (("cache_on", "-"), ("cache_off", "--")):
        latencies = result[arm]["latencies_s"]
        axis.step(latencies, [(i + 1) / len(latencies) for i in range(len(latencies))],
                  where="post", linestyle=style, label=f"{arm.replace('_', ' ')} "
                  f"(p50 {result[arm]['latency_p50_s']:.2f} s, p99 "
                  f"{result[arm]['latency_p99_s']:.2f} s)")
    axis.set_xlabel("end-to-end latency (s)")
    axis.set_ylabel("fraction of jobs")
    axis.set_title(f"Latency, cache on vs off ({result['requests']} requests, "
                   f"{result['arrivals']})")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_ratio_panels(series: dict[str, list[tuple[float, dict[str, Any]]]],
                       panels: tuple[tuple[str, str, float], ...], xlabel: str, title: str,
                       path: Path, nudge: float = 0.12) -> None:
    """One panel per (key, label, target): each series' ratio cells ({"value", "ci95"} under
    ``key``) at their x, the 95% intervals as error bars (series nudged apart by ``nudge``
    on x so they do not hide each other), the target dashed."""
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5))
    for axis, (key, label, target) in zip(axes, panels):
        for offset, (name, points) in enumerate(series.items()):
            xs = np.array([x for x, _ in points]) + nudge * (offset - len(series) / 2)
            cells = [point[key] for _, point in points]
            values = np.array([cell["value"] for cell in cells])
            spans = np.array([[value - cell["ci95"][0], cell["ci95"][1] - value]
                              for cell, value in zip(cells, values)]).T
            axis.errorbar(xs, values, yerr=spans, marker="o", capsize=3, label=name)
        axis.axhline(target, color="black", linestyle="--", linewidth=1,
                     label=f"target {target:.0%}")
        axis.set_xlabel(xlabel)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_compute_bars(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    """UNet compute per image per step cache, without and with across-request reuse."""
    positions = np.arange(len(rows))
    figure, axis = plt.subplots(figsize=(9, 4.5))
    axis.bar(positions - 0.2, [r["without_reuse"] for r in rows], 0.4,
             label="without across-request reuse")
    axis.bar(positions + 0.2, [r["with_reuse"] for r in rows], 0.4,
             label="with across-request reuse (replay)")
    axis.set_xticks(list(positions), [r["step_cache"] for r in rows], fontsize=8)
    axis.set_ylabel("UNet compute per image / plain")
    axis.set_ylim(0, 1.05)
    axis.grid(axis="y", alpha=0.3)
    axis.legend()
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def labelled_grid(rows: list[np.ndarray], columns: tuple[str, str], labels: list[str],
                  scale: int = 3) -> Image.Image:
    """Rows of image pairs, enlarged, under column headings, each row named on its right."""
    grid = np.concatenate(rows, 0)
    picture = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                           Image.Resampling.NEAREST)
    header, margin, row_height = 18, 420, picture.height // len(rows)
    canvas = Image.new("RGB", (picture.width + margin, picture.height + header), "white")
    canvas.paste(picture, (0, header))
    draw = ImageDraw.Draw(canvas)
    for index, heading in enumerate(columns):
        draw.text((index * picture.width // len(columns) + 4, 3), heading, fill="black")
    for index, label in enumerate(labels):
        draw.text((picture.width + 6, header + index * row_height + row_height // 2 - 6), label,
                  fill="black")
    return canvas


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args and args[0] in ("-h", "--help") else 2
    path = Path(args[0])
    result = json.loads(path.read_text())
    out = path.with_suffix("")
    for written in write_sweep_plots(result["rows"], out):
        print(f"written {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

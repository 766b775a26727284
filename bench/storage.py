"""Bytes per cached item and per entry, and what lossless compression would save.

    python -m bench.storage

Latents: captured at K = 5..25 of 50 from the tiny test model (64x64 and 256x256 images),
and seeded Gaussian latents of the SD-1.5 (4x64x64) and SDXL (4x128x128) shapes, which is
what an intermediate latent mostly is (signal plus a large share of noise). Stored as fp16
safetensors (workers/latents.py). Compression: zlib (stdlib) at levels 1 and 6.
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cachemgr.ktable import REFERENCE_TABLE
from core.jobs import JobRequest
from workers.builtin_models import build_tiny_pipeline
from workers.engine import Engine
from workers.latents import encode_latent


def measure(name: str, latents: list[torch.Tensor]) -> dict:
    encoded = [encode_latent(latent, "0123456789abcdef") for latent in latents]
    row: dict[str, Any] = {"latent": name, "shape": list(latents[0].shape), "items": len(encoded),
           "bytes_per_item": sum(map(len, encoded)) / len(encoded)}
    row["bytes_per_entry_5_items"] = 5 * row["bytes_per_item"]
    for level in (1, 6):
        started = time.perf_counter()
        compressed = [zlib.compress(data, level) for data in encoded]
        elapsed = time.perf_counter() - started
        row[f"zlib{level}_ratio"] = sum(map(len, compressed)) / sum(map(len, encoded))
        row[f"zlib{level}_ms_per_item"] = 1e3 * elapsed / len(encoded)
    return row


def main() -> int:
    engine = Engine(build_tiny_pipeline(), "ddim", torch.device("cpu"), "tiny")
    rows = []
    for size in tqdm((64, 256), desc="tiny model"):
        captured: list[torch.Tensor] = []
        for seed in range(4):
            request = JobRequest(f"storage probe {seed}", "", 50, 7.5, seed, size, size)
            captured += engine.generate(request, lambda *_: None,
                                        REFERENCE_TABLE.k_set(50)).captured.values()
        rows.append(measure(f"tiny-sd {size}x{size}", captured))
    generator = torch.Generator().manual_seed(0)
    for name, side in (("SD-1.5 512x512", 64), ("SDXL 1024x1024", 128)):
        rows.append(measure(name, [torch.randn(1, 4, side, side, generator=generator)
                                   for _ in range(20)]))
    out = Path("bench/results/storage.json")
    out.write_text(json.dumps({"command": "python -m bench.storage", "rows": rows}, indent=2))
    print(f"{'latent':18} {'bytes/item':>11} {'bytes/entry':>12} {'zlib1':>7} {'ms':>6} "
          f"{'zlib6':>7} {'ms':>6}")
    for r in rows:
        print(f"{r['latent']:18} {r['bytes_per_item']:11.0f} {r['bytes_per_entry_5_items']:12.0f} "
              f"{r['zlib1_ratio']:7.3f} {r['zlib1_ms_per_item']:6.2f} "
              f"{r['zlib6_ratio']:7.3f} {r['zlib6_ms_per_item']:6.2f}")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

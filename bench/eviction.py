"""Eviction cost per item on real stores: Redis catalog, S3 (SeaweedFS) latents, embedded
Chroma vectors, all started here on loopback in a temporary directory.

    python -m bench.eviction --entries 1000

Fills ENTRIES prompts x 5 items (SD-1.5-sized latent objects, 32,896 bytes), then evicts
half of the items with LCBFU and reports the time per evicted item, with the catalog
snapshot and the policy's ordering timed apart from the deletes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cachemgr.catalog import Catalog
from cachemgr.evictor import Evictor
from cachemgr.keys import latent_key
from cachemgr.policies import LCBFU, Budget, select_victims
from cachemgr.vectors import VectorIndex
from core.jobstore import connect
from core.objectstore import ObjectStore
from core.settings import ensure_secrets, load_settings
from infra import servers
from infra.ports import free_port

ITEM_BYTES = 32_896  # an SD-1.5 latent (4x64x64 fp16) as safetensors, see bench/results/storage.json
KS = (5, 10, 15, 20, 25)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1000, help="prompts to cache (x5 items)")
    parser.add_argument("--out", default="bench/results/eviction.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="t2i-evict-") as tmp:
        base = Path(tmp)
        redis_port = free_port()
        config = ensure_secrets(dataclasses.replace(
            load_settings({}, read_secrets=False), state_dir=tmp, s3_bucket="evict-bench",
            s3_endpoint=f"127.0.0.1:{free_port()}", s3_master_port=free_port()))
        with servers.running(servers.redis(redis_port, base / "redis"),
                             servers.s3(config, base / "s3"), log_dir=base):
            catalog = Catalog(connect(f"redis://127.0.0.1:{redis_port}/0"))
            objects = ObjectStore.from_settings(config)
            vectors = VectorIndex.open(base / "chroma", "", "bench")
            rng = np.random.default_rng(0)
            payload = rng.bytes(ITEM_BYTES)
            for index in tqdm(range(args.entries), desc="filling", unit="entry"):
                entry = f"e{index:06d}"
                for k in KS:
                    objects.put(latent_key("bench", entry, k), payload)
                catalog.register(entry, "bench", {k: ITEM_BYTES for k in KS}, now=float(index))
                vectors.add(entry, rng.normal(size=384), "bench", entry, float(index))
            items = catalog.item_count()
            budget = Budget(max_items=items - 1, low_water=0.5 * items / (items - 1))

            t0 = time.perf_counter()
            snapshot = catalog.snapshot()
            t1 = time.perf_counter()
            select_victims(LCBFU(), [i.stats() for i in snapshot], 0, items // 2, now=1e9)
            t2 = time.perf_counter()
            report = Evictor(catalog, objects, vectors, LCBFU(), budget).run(now=1e9)

    result = {
        "command": "python -m bench.eviction " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.node()}: {platform.machine()}, CPU only (shared, noisy)",
        "items_before": items, "evicted": report.evicted, "vectors_deleted": report.vectors_deleted,
        "evict_run_s": report.seconds,
        "ms_per_evicted_item": 1e3 * report.seconds / report.evicted,
        "snapshot_ms": 1e3 * (t1 - t0), "policy_order_ms": 1e3 * (t2 - t1),
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

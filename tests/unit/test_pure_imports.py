"""The pure domain logic imports no Celery, Redis, torch or network client: it stays testable
with injected time and runs anywhere (the replay simulator runs it on a laptop)."""

from __future__ import annotations

import json
import subprocess
import sys

PURE = ["core.jobs", "core.stepcache", "core.metrics", "core.webhooks", "core.logs",
        "core.errors", "core.plan", "core.batching", "cachemgr.plan", "cachemgr.policies", "cachemgr.routing",
        "cachemgr.ktable", "cachemgr.keys", "cachemgr.predictor", "cachemgr.simulator"]
FORBIDDEN = {"celery", "kombu", "redis", "torch", "chromadb", "minio", "httpx", "diffusers"}


def test_pure_modules_import_no_infrastructure() -> None:
    probe = (f"import importlib, json, sys\nfor m in {PURE!r}: importlib.import_module(m)\n"
             "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))")
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True,
                                           text=True, check=True).stdout))
    assert not loaded & FORBIDDEN, loaded & FORBIDDEN

"""The GPU benchmark's one command, dry-run on this CPU with the tiny model (a test of the
command and its JSON, not of the numbers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_benchmark_command_runs_end_to_end_on_the_cpu(tmp_path):
    out = tmp_path / "gpu-step.json"
    subprocess.run(["bash", "bench/gpu/run.sh", "--model", "tiny", "--device", "cpu",
                    "--models-dir", str(tmp_path / "models"), "--size", "64", "--steps", "10",
                    "--k", "5", "--batches", "1,2", "--timed-steps", "2", "--out", str(out)],
                   cwd=ROOT, check=True, timeout=600,
                   env={**os.environ, "PYTHON": sys.executable})
    result = json.loads(out.read_text())
    assert [(row["step_cache"], row["kind"], row["batch"]) for row in result["rows"]] == [
        (cache, kind, batch) for cache in ("off", "deepcache:3:0.2")
        for kind in ("full", "resumed") for batch in (1, 2)]
    for row in result["rows"]:
        assert row["ms_per_unet_call"] > 0 and row["images_per_s"] > 0
        assert row["steps_run"] == (10 if row["kind"] == "full" else 5)
    assert result["triage"]["ms_per_prompt"] > 0 and result["device"].startswith("CPU")

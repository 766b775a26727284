"""The add-on benchmark's command, run small with the scene model against its own S3 server
(a test of the command and its JSON, not of the numbers). In a process of its own: it sets
torch's thread count, which would change the float results of later tests in this one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_addon_benchmark_runs_every_arm_and_reports_equal_images(tmp_path):
    out = tmp_path / "addons"
    subprocess.run([sys.executable, "-m", "bench.addons", "--jobs", "6", "--rounds", "1",
                    "--loads", "1.0", "--cost-models", "scene", "--repeats", "1", "--batch",
                    "3", "--adapters", "3", "--out", str(out)], cwd=ROOT, check=True,
                   timeout=600)
    result = json.loads(out.with_suffix(".json").read_text())
    assert [row["arm"] for row in result["rows"]] == ["naive", "resident", "resident, batch 3"]
    assert all(row["jobs"] == 6 and row["throughput_jobs_s"] > 0 for row in result["rows"])
    assert result["equal_images"]["max_pixel_difference"] <= 1
    (costs,) = result["adapter_costs"]
    assert costs["cold_load_ms"] > costs["warm_load_ms"] > 0 and costs["adapted_layers"] > 0
    (control,) = result["controlnet_costs"]
    assert control["inline_over_plain"] > 1 and control["beside_over_plain"] > 0
    assert out.with_suffix(".png").stat().st_size > 0

"""The scaling benchmark end to end on a small synthetic trace (a test of the command and
that a second GPU worker takes jobs, not of the speed-up)."""

from __future__ import annotations

import json

import pytest
from test_replay_command import write_trace

from bench import scaling

pytestmark = pytest.mark.e2e


def test_second_gpu_worker_shares_the_batch(tmp_path):
    trace = tmp_path / "trace.csv.gz"
    write_trace(trace)
    out = tmp_path / "scaling"
    assert scaling.main(["--trace", str(trace), "--channel", "c1", "--limit", "3",
                         "--rounds", "1", "--steps", "20", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["jobs_per_batch"] == 3
    assert result["worker_processes_used"] == {"1 worker": [1], "2 workers": [2]}
    assert result["ratio_2_over_1_median"] > 0
    assert "Median throughput ratio" in out.with_suffix(".md").read_text()

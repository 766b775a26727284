"""The affinity simulation's command, run small (a test of the command, its JSON and the
rule's direction on a fixed trace, not of the published numbers)."""

from __future__ import annotations

import json

import pytest

from bench.affinity import main


def test_the_affinity_simulation_runs_each_mode_on_the_same_trace(tmp_path, capsys) -> None:
    out = tmp_path / "affinity"
    assert main(["--jobs", "1500", "--seeds", "2", "--cold-s", "0.091,1.0", "--out",
                 str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["simulated"] and [row["cold_s"] for row in result["rows"]] == [0.091, 1.0]
    for row in result["rows"]:
        loads = {mode: row[mode]["cold_loads_per_lora_job"]["mean"]
                 for mode in ("off", "free", "queue")}
        assert loads["queue"] < loads["free"] <= loads["off"], loads  # fewer loads each step
    hidden = result["rows"][0]   # a 91 ms load hides behind the first 0.4 s: nobody waits
    assert all(hidden[mode]["adapter_wait_mean_s"]["max"] == 0 for mode in ("off", "free"))
    assert hidden["free_latency_over_off"]["mean"] == pytest.approx(1.0)
    assert out.with_suffix(".png").stat().st_size > 0
    assert "loads per LoRA job off" in capsys.readouterr().out

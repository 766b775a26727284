"""The live replay end to end on a toy-world trace: four real stacks, cache on and off, with
and without the step cache, every image scored and resumed images compared with the same
requests from scratch (a test of the command, not of the numbers)."""

from __future__ import annotations

import json

import pytest

from bench import replay_live
from quality import evaluator, toy_trace

pytestmark = pytest.mark.e2e


def test_live_replay_scores_every_arm_and_pairs_resumed_jobs(tmp_path, monkeypatch):
    monkeypatch.setenv("T2I_MODEL", "scene")  # the step cache's FLOPs are counted for it
    trace = tmp_path / "toy.csv.gz"
    # One user re-rolling one prompt: from the second request on, every job can resume (from
    # K 1 of 25, the seed cap: each re-roll has its own seed).
    assert toy_trace.main(["--requests", "4", "--users", "1", "--edit", "0", "--reroll", "1",
                           "--rephrase", "0", "--revisit", "0", "--out", str(trace)]) == 0
    weights = tmp_path / "evaluator.pt"
    evaluator.save(evaluator.train(scenes=128, epochs=1, seed=0, progress=False), weights)
    out = tmp_path / "live"
    assert replay_live.main(["--trace", str(trace), "--channel", "toy", "--limit", "4",
                             "--steps", "25", "--size-divisor", "1", "--warmup", "0",
                             "--scorer", f"scene:{weights}", "--step-cache", "deepcache:3",
                             "--out", str(out)]) == 0

    result = json.loads(out.with_suffix(".json").read_text())
    assert result["cache_on"]["succeeded"] == result["cache_off"]["succeeded"] == 4
    assert result["cache_off"]["hit_rate"] == 0 and result["cache_on"]["hit_rate"] > 0
    quality = result["quality"]
    assert quality["scorer"] == "scene-adherence"
    assert quality["resumed_compared"] == round(result["cache_on"]["hit_rate"] * 4)
    for key in ("score_mean_cache_on", "score_mean_cache_off", "score_mean_resumed",
                "score_mean_resumed_same_requests_from_scratch"):
        assert 0 <= quality[key] <= 1
    assert all(sample["k"] > 0 for sample in quality["samples"])
    diversity = quality["reroll_diversity"]
    assert diversity["prompts"] == 1 and diversity["images"] == 4
    for measure in ("pixels", "evaluator_features"):
        assert diversity[measure]["cache_on"] > 0 and diversity[measure]["cache_off"] > 0
        assert diversity[measure]["ratio_on_off"]["value"] > 0
    assert (tmp_path / "live-samples.png").stat().st_size > 0
    for arm in ("cache_on", "cache_off"):  # the CDF's data: every job's latency, sorted
        assert len(result[arm]["latencies_s"]) == 4
        assert result[arm]["latencies_s"] == sorted(result[arm]["latencies_s"])
    assert (tmp_path / "live-latency-cdf.png").stat().st_size > 0
    intervals = result["intervals"]  # over the 4 requests both arms answered
    assert intervals["requests"] == 4
    saved, latency = intervals["steps_saved_frac"], intervals["latency_ratio_on_off"]
    assert saved["value"] == pytest.approx(result["cache_on"]["steps_saved_frac"], abs=1e-4)
    assert latency["value"] > 0
    all_jobs = quality["score_ratio_all_jobs_on_off_ci95"]
    for cell in (saved, latency) + ((all_jobs,) if all_jobs["value"] is not None else ()):
        assert cell["ci95"][0] <= cell["value"] <= cell["ci95"][1]
    report = out.with_suffix(".md").read_text()
    assert "Resumed vs the same requests from scratch" in report
    assert "95% bootstrap intervals over the 4 requests" in report
    assert result["step_caches"] == {"cache_on": "off", "cache_off": "off",
                                     "cache_on_step": "deepcache:3",
                                     "cache_off_step": "deepcache:3"}
    compute = result["unet_compute"]
    assert compute["requests"] == 4 and 0 < compute["shallow_cost"] < 1
    arms = compute["arms"]
    assert {name: arm["step_cache"] for name, arm in arms.items()} == {
        "cache_on": "off", "cache_off": "off", "cache_on_step": "deepcache:3",
        "cache_off_step": "deepcache:3"}
    frac = {name: arm["compute_per_image_frac"]["value"] for name, arm in arms.items()}
    assert frac["cache_off"] == 1.0  # plain: every step asked ran the whole UNet
    assert frac["cache_on"] == pytest.approx(1 - saved["value"], abs=1e-4)
    # 25 steps with deepcache:3: 9 whole, 16 shallow
    assert frac["cache_off_step"] == pytest.approx((9 + 16 * compute["shallow_cost"]) / 25,
                                                   abs=1e-3)
    assert frac["cache_on_step"] < frac["cache_off_step"]
    assert set(quality["arms_vs_cache_off"]) == {"cache_on", "cache_on_step", "cache_off_step"}
    assert "UNet compute per image" in report and "within-request (step cache) only" in report

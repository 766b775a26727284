"""The offline replay command end to end on a small synthetic trace (a test of the command,
not of the numbers)."""

from __future__ import annotations

import csv
import gzip
import json

import pytest

from bench import replay

HEADER = ["channel", "seq", "user_hash", "prompt", "seed", "n_images", "width", "height", "cfg",
          "steps", "sampler", "grid", "latency_s"]
PROMPTS = ["a castle on a hill at dawn", "a castle on a hill at dawn",
           "a castle on a hill at dusk", "a bowl of soup", "", "a red sports car"]


def write_trace(path) -> None:
    with gzip.open(path, "wt", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        for seq, prompt in enumerate(PROMPTS):
            channel = "c1" if seq % 2 else "c2"
            writer.writerow([channel, seq, "u1", prompt, seq, 1, 512, 512, "", "", "", 0, 4.0])


def test_policy_sweep_writes_rows(tmp_path):
    trace = tmp_path / "trace.csv.gz"
    write_trace(trace)
    out = tmp_path / "result"
    assert replay.main(["--trace", str(trace), "--policies", "lcbfu,none", "--budgets", "0,1",
                        "--rules", "new,old", "--cache-dir", str(tmp_path / "emb"),
                        "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["policy"], r["budget_prompts"], r["rules"]) for r in rows] == [
        (policy, budget, rules) for rules in ("new", "old") for policy in ("lcbfu", "none")
        for budget in (None, 1)]
    unbounded = rows[0]
    # The trace's one repeat has another seed: a re-roll, saving what the split says.
    assert set(unbounded["steps_saved_frac_by_kind"]) <= {"re-roll", "near edit", "chained"}
    assert unbounded["steps_saved_frac_by_kind"]["re-roll"] > 0
    assert sum(unbounded["steps_saved_frac_by_kind"].values()) == \
        pytest.approx(unbounded["steps_saved_frac"])
    assert unbounded["requests"] == 5  # the empty prompt is skipped
    # Another seed's latent serves K 2 of 50 (the seed cap); the old rules took K 25.
    assert unbounded["hit_rate"] >= 0.2 and unbounded["k_histogram"].get("2", 0) >= 1
    assert rows[4]["k_histogram"].get("25", 0) >= 1
    assert rows[2]["hit_rate"] == 0.0
    assert list((tmp_path / "emb" / "minilm").glob("chunk-*.npy"))  # kept for the next run
    assert list((tmp_path / "emb" / "neighbours").glob("neighbours-5-*.npz"))
    assert (tmp_path / "result-steps-saved.png").stat().st_size > 0
    assert (tmp_path / "result-k-and-hits.png").stat().st_size > 0
    table = out.with_suffix(".md").read_text()
    assert "| lcbfu | unbounded | minilm | reference | new | kept |" in table
    assert "| lcbfu | unbounded | minilm | reference | old | kept |" in table
    assert unbounded["admit_resumed"] is True


def test_similarity_profile(tmp_path):
    trace = tmp_path / "trace.csv.gz"
    write_trace(trace)
    out = tmp_path / "profile"
    assert replay.main(["--trace", str(trace), "--similarity-profile",
                        "--cache-dir", str(tmp_path / "emb"), "--out", str(out)]) == 0
    profile = json.loads(out.with_suffix(".json").read_text())["similarity_profile"]
    assert profile["first_of_partition"] == 1 and sum(profile["histogram"]["counts"]) == 4
    assert profile["share_at_or_above"]["0.95"] >= 0.25  # the exact repeat
    assert profile["exact_vs_chroma"]["agreement"] == 1.0
    assert (tmp_path / "profile-similarity.png").stat().st_size > 0


def test_embedding_store_embeds_only_new_prompts(tmp_path):
    from bench.embeddings import EmbeddingStore

    store = EmbeddingStore(tmp_path, "minilm")
    first = store.matrix(["a red car", "a blue car", "a red car"])
    assert first.shape == (3, 384) and (first[0] == first[2]).all()
    second = store.matrix(["a blue car", "a green car"])
    chunks = sorted((tmp_path / "minilm").glob("chunk-*.json"), key=lambda p: p.stat().st_mtime)
    assert [json.loads(c.read_text()) for c in chunks] == [["a red car", "a blue car"],
                                                           ["a green car"]]
    assert (second[0] == first[1]).all()

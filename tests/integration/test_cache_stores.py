"""The cache catalog (real Redis) and the vector index (real embedded Chroma)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from cachemgr.catalog import Catalog
from cachemgr.vectors import VectorIndex
from core.jobstore import connect


@pytest.fixture()
def catalog(redis_url: str) -> Catalog:
    client = connect(redis_url)
    for key in client.scan_iter("t2i:cache:*"):
        client.delete(key)
    return Catalog(client)


def test_register_is_idempotent_and_counts_bytes(catalog: Catalog):
    sizes = {5: 100, 10: 100, 25: 120}
    assert catalog.register("e1", "p", sizes, now=10.0) == 3
    assert catalog.register("e1", "p", sizes, now=11.0) == 0  # redelivered: nothing doubles
    assert catalog.stored_ks("e1") == {5, 10, 25}
    assert catalog.total_bytes() == 320 and catalog.item_count() == 3
    item = catalog.item("e1", 25)
    assert (item.partition, item.size, item.created_at, item.hits) == ("p", 120, 10.0, 0)


def test_hits_are_counted_atomically(catalog: Catalog):
    catalog.register("e2", "p", {10: 50}, now=1.0)

    def hit() -> None:
        for _ in range(100):
            catalog.record_hit("e2", 10, now=5.0)

    threads = [threading.Thread(target=hit) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert catalog.item("e2", 10).hits == 400


def test_hit_on_a_missing_item_is_none(catalog: Catalog):
    assert catalog.record_hit("gone", 5, now=1.0) is None
    assert catalog.stored_ks("gone") == frozenset()


def unit(vector) -> list[float]:
    array = np.asarray(vector, dtype=np.float32)
    return list(array / np.linalg.norm(array))


@pytest.fixture(params=["embedded", "server"])
def index(request, tmp_path) -> VectorIndex:
    """The same tests against embedded Chroma and a `chroma run` server."""
    if request.param == "embedded":
        return VectorIndex.open(tmp_path / "chroma", "", "test-embedder")
    url = request.getfixturevalue("chroma_url")
    return VectorIndex.open(None, url, f"test-{tmp_path.name[-20:].strip('_')}")


def test_nearest_stays_inside_its_partition(index: VectorIndex):
    index.add("a", unit([1, 0, 0]), "p1", "prompt a", 1.0)
    index.add("b", unit([0.9, 0.1, 0]), "p2", "prompt b", 1.0)
    [(entry, similarity)] = index.nearest(unit([0.95, 0.05, 0]), "p1", n=4)
    assert entry == "a" and similarity == pytest.approx(float(np.dot(unit([1, 0, 0]),
                                                                  unit([0.95, 0.05, 0]))), abs=1e-5)
    assert index.nearest(unit([1, 0, 0]), "p3") == []


def test_nearest_few_come_nearest_first(index: VectorIndex):
    for name, vector in [("far", [0, 1, 0]), ("near", [1, 0.1, 0]), ("mid", [1, 0.6, 0])]:
        index.add(name, unit(vector), "p", name, 1.0)
    found = index.nearest(unit([1, 0, 0]), "p", n=2)
    assert [entry for entry, _ in found] == ["near", "mid"]
    assert found[0][1] > found[1][1] > 0.5


def test_add_is_an_upsert_and_delete_removes(index: VectorIndex):
    index.add("a", unit([1, 0, 0]), "p", "x", 1.0)
    index.add("a", unit([0, 1, 0]), "p", "x", 2.0)
    assert index.count() == 1
    assert index.nearest(unit([0, 1, 0]), "p")[0][1] == pytest.approx(1.0, abs=1e-5)
    assert index.ids() == [("p", "a")]
    index.delete("a", "p")
    assert index.count() == 0 and index.nearest(unit([0, 1, 0]), "p") == []


def test_index_persists_across_clients(tmp_path):
    VectorIndex.open(tmp_path / "c", "", "e").add("a", unit([1, 2, 3]), "p", "x", 1.0)
    assert VectorIndex.open(tmp_path / "c", "", "e").nearest(unit([1, 2, 3]), "p")[0][0] == "a"


def test_unreachable_server_raises_vector_index_unavailable():
    from core.errors import VectorIndexUnavailable
    from infra.ports import free_port

    with pytest.raises(VectorIndexUnavailable, match="Chroma"):
        VectorIndex.open(None, f"http://127.0.0.1:{free_port()}", "e")


def test_concurrent_registrations_of_one_entry_store_it_once(catalog: Catalog, tmp_path,
                                                             redis_url):
    """A generation redelivered while its first registration still runs: two cache.register
    tasks for the same entry at once, against real Redis and real (embedded) Chroma. The
    prompt comes from the entry's job record, not the message."""
    from core.jobs import JobRecord, JobRequest, JobState
    from core.jobstore import JobStore, connect
    from workers.triage import register_entry

    jobs = JobStore(connect(redis_url), 3600)
    jobs.create(JobRecord(id="e9", state=JobState.SUCCEEDED, model="tiny", submitted_at=0.0,
                          request=JobRequest("a red fox", "", 15, 7.5, 1, 64, 64)))

    class Embedder:
        name = "test"

        def embed(self, prompts: list[str]) -> np.ndarray:
            return np.stack([unit([1, 2, 3])] * len(prompts))

    index = VectorIndex.open(tmp_path / "chroma", "", "test-embedder")
    sizes = {5: 100, 10: 100, 15: 100}
    barrier = threading.Barrier(4)
    results: list[dict] = []

    def register() -> None:
        barrier.wait()
        results.append(register_entry("e9", "p", sizes, jobs, Embedder(), index, catalog,
                                      lambda: 1.0))

    threads = [threading.Thread(target=register) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r["new"] for r in results) == 3  # each item new exactly once
    assert catalog.stored_ks("e9") == {5, 10, 15}
    assert catalog.item_count() == 3 and catalog.total_bytes() == 300
    assert index.ids() == [("p", "e9")]
    assert catalog.snapshot()[0].prompt == "a red fox"

"""Eviction and the sweep against real Redis, S3 and Chroma: the budget holds, the three
stores agree, crashes midway are repaired, and concurrent evictors never double-delete."""

from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np
import pytest

from cachemgr.catalog import Catalog
from cachemgr.evictor import LOCK_NAME, Evictor, sweep
from cachemgr.keys import latent_key
from cachemgr.policies import LCBFU, Budget
from cachemgr.vectors import VectorIndex
from core.jobstore import connect
from core.objectstore import ObjectStore

PARTITION = "evict-test"
KS = (5, 10, 15, 20, 25)
ITEM_BYTES = 100


@pytest.fixture()
def stores(redis_url, s3_server, tmp_path):
    client = connect(redis_url)
    for key in client.scan_iter("t2i:cache:*"):
        client.delete(key)
    objects = ObjectStore.from_settings(s3_server)
    objects.ensure_bucket()
    for key in objects.keys("cache/"):
        objects.delete(key)
    return Catalog(client), objects, VectorIndex.open(tmp_path / "chroma", "", "evict")


def fill(stores, entries: int, start: float = 0.0) -> list[str]:
    catalog, objects, vectors = stores
    names = [f"entry{index:03d}" for index in range(entries)]
    rng = np.random.default_rng(0)
    for offset, entry in enumerate(names):
        for k in KS:
            objects.put(latent_key(PARTITION, entry, k), b"x" * ITEM_BYTES)
        catalog.register(entry, PARTITION, {k: ITEM_BYTES for k in KS}, now=start + offset)
        vectors.add(entry, rng.normal(size=8), PARTITION, entry, start + offset)
    return names


def assert_stores_agree(stores) -> None:
    catalog, objects, vectors = stores
    items = catalog.snapshot()
    cataloged = {latent_key(i.partition, i.entry, i.k) for i in items}
    assert cataloged == set(objects.keys("cache/"))
    assert {(i.partition, i.entry) for i in items} == set(vectors.ids())
    assert catalog.total_bytes() == ITEM_BYTES * len(items) == sum(i.size for i in items)


def no_embedding(prompts: list[str]) -> np.ndarray:
    raise AssertionError(f"nothing to re-index here, yet asked to embed {prompts}")


def test_fill_past_budget_then_evict_to_low_water(stores):
    catalog, objects, vectors = stores
    fill(stores, 20)                                   # 100 items, 10,000 bytes
    budget = Budget(max_items=60, max_bytes=8000, low_water=0.5)
    report = Evictor(catalog, objects, vectors, LCBFU(), budget).run(now=100.0)
    assert report.ran and report.evicted == 70         # items: 100 -> 30 (bytes: -> 3,000)
    assert catalog.item_count() == 30 and catalog.total_bytes() == 3000
    assert_stores_agree(stores)
    assert vectors.count() == 6 and report.vectors_deleted == 14
    again = Evictor(catalog, objects, vectors, LCBFU(), budget).run(now=101.0)
    assert not again.ran and again.evicted == 0        # within budget: nothing to do


def test_lcbfu_keeps_the_items_that_saved_most(stores):
    catalog, objects, vectors = stores
    fill(stores, 4)
    for _ in range(3):
        catalog.record_hit("entry000", 25, now=50.0)
    catalog.record_hit("entry003", 5, now=50.0)
    Evictor(catalog, objects, vectors, LCBFU(), Budget(max_items=3, low_water=1.0)).run(now=60.0)
    kept = {(i.entry, i.k) for i in catalog.snapshot()}
    assert ("entry000", 25) in kept and ("entry003", 5) in kept and len(kept) == 3
    assert_stores_agree(stores)


class Crash(Exception):
    pass


def crash_on_call(function, call: int):
    """Wrap ``function`` so its ``call``-th call raises, as if the process died there."""
    calls = 0

    def wrapper(*args):
        nonlocal calls
        calls += 1
        if calls == call:
            raise Crash("evictor died")
        return function(*args)
    return wrapper


def test_crash_between_deletes_leaves_holes_and_the_sweep_repairs(stores):
    catalog, objects, vectors = stores
    fill(stores, 6)
    evictor = Evictor(catalog, objects, vectors, LCBFU(), Budget(max_items=10, low_water=1.0))
    real_delete = objects.delete
    objects.delete = crash_on_call(real_delete, 4)
    with pytest.raises(Crash):
        evictor.run(200.0)
    objects.delete = real_delete
    # entry000 K=20 left the catalog but its object stayed: triage sees a hole at K=20.
    assert catalog.stored_ks("entry000") == {25} and len(objects.keys("cache/")) == 27
    vectors_delete = vectors.delete
    vectors.delete = crash_on_call(vectors_delete, 1)
    with pytest.raises(Crash):
        evictor.run(201.0)
    vectors.delete = vectors_delete
    # entry000 has no item left but kept its vector: triage finds it and sees no stored K.
    assert catalog.stored_ks("entry000") == frozenset() and (PARTITION, "entry000") in vectors.ids()
    # Vectors without items go at once; young objects are spared (a generation uploads its
    # latents before it registers them) ...
    first = sweep(catalog, objects, vectors, now=time.time(), grace_s=3600, embed=no_embedding)
    assert (first.orphan_vectors, first.orphan_objects) == (1, 0)
    # ... and removed once old, and then the stores agree again.
    assert sweep(catalog, objects, vectors, now=time.time() + 7200, grace_s=3600,
                 embed=no_embedding).orphan_objects == 1
    assert_stores_agree(stores)


def test_sweep_drops_records_whose_object_is_gone(stores):
    catalog, objects, vectors = stores
    fill(stores, 2)
    objects.delete(latent_key(PARTITION, "entry001", 10))
    report = sweep(catalog, objects, vectors, now=10_000.0, grace_s=60, embed=no_embedding)
    assert report.missing_objects == 1 and catalog.stored_ks("entry001") == {5, 15, 20, 25}
    assert_stores_agree(stores)


def test_two_evictors_at_once_do_not_double_delete(stores):
    catalog, objects, vectors = stores
    fill(stores, 20)
    deleted: Counter[str] = Counter()
    real_delete = objects.delete

    def counting_delete(key: str) -> None:
        deleted[key] += 1
        time.sleep(0.002)  # widen the window in which the two could overlap
        real_delete(key)

    objects.delete = counting_delete
    budget = Budget(max_items=50, low_water=1.0)
    reports = []
    threads = [threading.Thread(target=lambda: reports.append(
        Evictor(catalog, objects, vectors, LCBFU(), budget).run(now=300.0))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    objects.delete = real_delete
    assert sum(r.evicted for r in reports) == 50 and catalog.item_count() == 50
    assert all(count == 1 for count in deleted.values()) and len(deleted) == 50
    assert_stores_agree(stores)


def test_a_dead_evictors_lock_expires(stores):
    catalog, objects, vectors = stores
    fill(stores, 2)
    assert catalog.lock(LOCK_NAME, ttl_s=0.5).acquire()   # held by a process that died
    evictor = Evictor(catalog, objects, vectors, LCBFU(), Budget(max_items=5, low_water=1.0))
    assert evictor.run(now=1.0).locked_out
    time.sleep(0.6)
    assert evictor.run(now=2.0).evicted == 5


def test_sweep_rebuilds_a_lost_vector_index_from_the_catalog(stores, tmp_path):
    from workers.embedder import MiniLMEmbedder

    catalog, objects, _ = stores
    embedder = MiniLMEmbedder()
    prompts = {"old1": "a fox in the snow", "old2": "a boat at sea", "young": "a red kite"}
    for created, (entry, prompt) in enumerate(prompts.items()):
        for k in KS:
            objects.put(latent_key(PARTITION, entry, k), b"x" * ITEM_BYTES)
        catalog.register(entry, PARTITION, {k: ITEM_BYTES for k in KS}, now=100.0 * created,
                         prompt=prompt)
    wiped = VectorIndex.open(tmp_path / "fresh-chroma", "", "evict")  # the old index is gone
    report = sweep(catalog, objects, wiped, now=250.0, grace_s=60, embed=embedder.embed)
    assert report.reindexed == 2 and set(wiped.ids()) == {(PARTITION, "old1"), (PARTITION, "old2")}
    [(entry, similarity)] = wiped.nearest(embedder.embed(["a fox in the snow"])[0], PARTITION)
    assert entry == "old1" and similarity > 0.999
    assert sweep(catalog, objects, wiped, now=1000.0, grace_s=60, embed=embedder.embed).reindexed == 1

"""Eviction and the orphan sweep over the cache's three stores.

Order matters because the stores are not updated together: an item leaves the catalog
first (triage stops offering it at once), then its latent object, then, when its prompt has
no item left, the prompt's vector. A crash between steps leaves only things triage already
treats as a hole or a miss (an object nobody points to, a vector with no items), and the
sweep removes those later.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
from redis.exceptions import LockError

from cachemgr.catalog import CacheItem, Catalog
from cachemgr.keys import latent_key
from cachemgr.policies import Budget, Policy, select_victims
from cachemgr.vectors import VectorIndex
from core.objectstore import ObjectStore

log = logging.getLogger(__name__)

LOCK_NAME = "evictor"


@dataclass
class EvictionReport:
    ran: bool = False                  # False: within budget, or another evictor holds the lock
    locked_out: bool = False
    evicted: int = 0
    freed_bytes: int = 0
    vectors_deleted: int = 0
    seconds: float = 0.0
    evicted_items: list[str] = field(default_factory=list)


@dataclass
class SweepReport:
    orphan_objects: int = 0
    missing_objects: int = 0
    orphan_vectors: int = 0
    reindexed: int = 0           # cataloged entries whose vector was lost, added back


class Evictor:
    def __init__(self, catalog: Catalog, objects: ObjectStore, vectors: VectorIndex,
                 policy: Policy, budget: Budget, keep_recent_s: float = 0.0,
                 lock_ttl_s: float = 120.0) -> None:
        self.catalog, self.objects, self.vectors = catalog, objects, vectors
        self.policy, self.budget = policy, budget
        self.keep_recent_s, self.lock_ttl_s = keep_recent_s, lock_ttl_s

    def run(self, now: float) -> EvictionReport:
        """Evict down to the low-water mark if over budget. One evictor at a time."""
        report = EvictionReport()
        if self.policy.admits and not self.budget.over(self.catalog.total_bytes(),
                                                       self.catalog.item_count()):
            return report
        lock = self.catalog.lock(LOCK_NAME, self.lock_ttl_s)
        if not lock.acquire():
            report.locked_out = True
            return report
        started = time.perf_counter()
        try:
            free_bytes, free_items = self.budget.excess(self.catalog.total_bytes(),
                                                        self.catalog.item_count())
            items = {(i.entry, i.k): i for i in self.catalog.snapshot()}
            victims = select_victims(self.policy, [i.stats() for i in items.values()],
                                     free_bytes, free_items, now, self.keep_recent_s)
            report.ran = True
            for victim in victims:
                self._evict(items[(str(victim.entry), victim.k)], report)
        finally:
            try:
                lock.release()
            except LockError:
                log.warning("evictor lock expired before release (run longer than %ss)",
                            self.lock_ttl_s)
        report.seconds = time.perf_counter() - started
        if report.evicted:
            log.info("evicted %d items (%d bytes, %d vectors) in %.3fs by %s", report.evicted,
                     report.freed_bytes, report.vectors_deleted, report.seconds, self.policy.name)
        return report

    def _evict(self, item: CacheItem, report: EvictionReport) -> None:
        left = self.catalog.remove_item(item.entry, item.k)
        if left is None:
            return  # already removed elsewhere: never delete twice
        report.evicted += 1
        report.freed_bytes += item.size
        report.evicted_items.append(f"{item.entry}:{item.k}")
        self.objects.delete(latent_key(item.partition, item.entry, item.k))
        if left == 0:
            self.vectors.delete(item.entry, item.partition)
            report.vectors_deleted += 1


def sweep(catalog: Catalog, objects: ObjectStore, vectors: VectorIndex, now: float,
          grace_s: float, embed: Callable[[list[str]], np.ndarray]) -> SweepReport:
    """Repair what a crash between stores left behind, and rebuild the vector index from
    the catalog where it lost entries (a Chroma wiped or restored from an old backup).
    Objects and records younger than ``grace_s`` are left alone: a generation uploads its
    latents before it registers them, and registers items before their vector."""
    report = SweepReport()
    stored = objects.modified_times("cache/")
    items = catalog.snapshot()
    cataloged = {latent_key(i.partition, i.entry, i.k): i for i in items}
    for key, modified in stored.items():
        if key not in cataloged and now - modified > grace_s:
            objects.delete(key)
            report.orphan_objects += 1
    for key, item in cataloged.items():
        if key not in stored and now - item.created_at > grace_s:
            catalog.remove_item(item.entry, item.k)
            report.missing_objects += 1
    indexed = set()
    for partition, entry in vectors.ids():
        indexed.add(entry)
        if not catalog.stored_ks(entry):
            vectors.delete(entry, partition)
            report.orphan_vectors += 1
    lost = {i.entry: i for i in items
            if i.entry not in indexed and i.prompt and now - i.created_at > grace_s}
    for item in lost.values():
        vectors.add(item.entry, embed([item.prompt])[0], item.partition, item.prompt,
                    item.created_at)
        report.reindexed += 1
    if any(asdict(report).values()):
        log.info("sweep: %s", report)
    return report

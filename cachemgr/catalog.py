"""The cache catalog in Redis: one record per cached (entry, K) latent.

Keys (all under ``t2i:cache:``):
  item:{entry}:{k}  hash: entry, k, partition, size, created_at, hits, last_used_at
  entry:{entry}     set of the K values stored for an entry
  scores            sorted set "{entry}:{k}" -> K x hits (the LCBFU score, kept current)
  bytes             running total of stored latent bytes
  lineage:{entry}   JSON: which prompt ran which steps of the entry's latents, their noise
                    seed (core.plan.Lineage); removed with the entry's last item
Scripts keep each change atomic, so a redelivered registration never double counts and
two removals of one item never double subtract. The budget check (bytes and item count) is
O(1); inserts, hits and removals are O(log n).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import redis
from redis.lock import Lock

from cachemgr.policies import ItemStats
from cachemgr.routing import CachedEntry
from core.jobstore import redis_errors
from core.plan import Lineage

PREFIX = "t2i:cache:"
SCORES = PREFIX + "scores"   # sorted set: every item as "entry:k" (its scores unused)
BYTES = PREFIX + "bytes"

# KEYS: item, entry set, scores, bytes. ARGV: entry, k, partition, size, created_at, prompt.
# The prompt is kept so the vector index can be rebuilt from the catalog.
_REGISTER = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'entry', ARGV[1], 'k', ARGV[2], 'partition', ARGV[3],
           'size', ARGV[4], 'created_at', ARGV[5], 'hits', 0, 'last_used_at', ARGV[5],
           'prompt', ARGV[6])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], 0, ARGV[1] .. ':' .. ARGV[2])
redis.call('INCRBY', KEYS[4], ARGV[4])
return 1
"""

# KEYS: item. ARGV: now. Returns the new hit count, -1 if the item is gone. (Scores are
# the policies' to compute, from the items: the sorted set only lists them.)
_HIT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local hits = redis.call('HINCRBY', KEYS[1], 'hits', 1)
redis.call('HSET', KEYS[1], 'last_used_at', ARGV[1])
return hits
"""

# KEYS: item, entry set, scores, bytes, lineage. ARGV: member, k.
# Returns the number of items the entry still has, or -1 if this item was already gone.
_REMOVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local size = redis.call('HGET', KEYS[1], 'size')
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('DECRBY', KEYS[4], size)
local left = redis.call('SCARD', KEYS[2])
if left == 0 then redis.call('DEL', KEYS[5]) end
return left
"""


@dataclass(frozen=True)
class CacheItem:
    entry: str
    k: int
    partition: str
    size: int
    created_at: float
    hits: int
    last_used_at: float
    prompt: str = ""

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> CacheItem:
        return cls(entry=raw["entry"], k=int(raw["k"]), partition=raw["partition"],
                   size=int(raw["size"]), created_at=float(raw["created_at"]),
                   hits=int(raw["hits"]), last_used_at=float(raw["last_used_at"]),
                   prompt=raw.get("prompt", ""))

    def stats(self) -> ItemStats:
        """The policy's view of this item."""
        return ItemStats(entry=self.entry, k=self.k, size=self.size, created_at=self.created_at,
                         hits=self.hits, last_used_at=self.last_used_at)


def item_key(entry: str, k: int) -> str:
    return f"{PREFIX}item:{entry}:{k}"


def entry_key(entry: str) -> str:
    return f"{PREFIX}entry:{entry}"


def lineage_key(entry: str) -> str:
    return f"{PREFIX}lineage:{entry}"


class Catalog:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._register = client.register_script(_REGISTER)
        self._hit = client.register_script(_HIT)
        self._remove = client.register_script(_REMOVE)

    def register(self, entry: str, partition: str, sizes: dict[int, int], now: float,
                 prompt: str = "", lineage: Lineage | None = None) -> int:
        """Record the items of a new entry (its lineage first, so an item is never seen
        without it); returns how many were new."""
        added = 0
        with redis_errors():
            if lineage is not None:
                self._redis.set(lineage_key(entry), json.dumps(lineage.to_dict()))
            for k, size in sorted(sizes.items()):
                added += self._register(keys=[item_key(entry, k), entry_key(entry), SCORES, BYTES],
                                        args=[entry, k, partition, size, now, prompt])
        return added

    def stored_ks(self, entry: str) -> frozenset[int]:
        with redis_errors():
            return frozenset(int(k) for k in self._redis.smembers(entry_key(entry)))

    def entry(self, entry: str) -> CachedEntry | None:
        """Its stored Ks and lineage, for triage; None when it has no item or no lineage
        (cached before lineage was kept: not offered, as its seed is unknown)."""
        with redis_errors():
            pipe = self._redis.pipeline(transaction=False)
            pipe.smembers(entry_key(entry))
            pipe.get(lineage_key(entry))
            ks, lineage = pipe.execute()
        if not ks or not lineage:
            return None
        return CachedEntry(frozenset(int(k) for k in ks),
                           Lineage.from_dict(json.loads(lineage)))

    def record_hit(self, entry: str, k: int, now: float) -> int | None:
        """Count one reuse of (entry, k) atomically; None if the item is no longer cataloged."""
        with redis_errors():
            hits = self._hit(keys=[item_key(entry, k)], args=[now])
        return None if hits < 0 else int(hits)

    def remove_item(self, entry: str, k: int) -> int | None:
        """Drop (entry, k) from the catalog; returns how many items the entry has left, or
        None if it was already gone (another evictor, or the sweep, got there first)."""
        with redis_errors():
            left = self._remove(keys=[item_key(entry, k), entry_key(entry), SCORES, BYTES,
                                      lineage_key(entry)], args=[f"{entry}:{k}", k])
        return None if left < 0 else int(left)

    def item(self, entry: str, k: int) -> CacheItem | None:
        with redis_errors():
            raw = self._redis.hgetall(item_key(entry, k))
        return CacheItem.from_hash(raw) if raw else None

    def snapshot(self) -> list[CacheItem]:
        """Every cataloged item (for the evictor and the sweep; pipelined reads)."""
        with redis_errors():
            members = self._redis.zrange(SCORES, 0, -1)
            pipe = self._redis.pipeline(transaction=False)
            for member in members:
                entry, k = member.rsplit(":", 1)
                pipe.hgetall(item_key(entry, int(k)))
            return [CacheItem.from_hash(raw) for raw in pipe.execute() if raw]

    def lock(self, name: str, ttl_s: float) -> Lock:
        """A Redis lock that expires by itself, so a dead holder cannot block others."""
        return self._redis.lock(f"{PREFIX}lock:{name}", timeout=ttl_s, blocking=False)

    def total_bytes(self) -> int:
        with redis_errors():
            return int(self._redis.get(BYTES) or 0)

    def item_count(self) -> int:
        with redis_errors():
            return self._redis.zcard(SCORES)


class InMemoryCatalog:
    """The catalog's in-memory twin (what GPU workers and triage call of it), for worker
    logic tested without Redis."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, int], CacheItem] = {}
        self.lineages: dict[str, Lineage] = {}

    def register(self, entry: str, partition: str, sizes: dict[int, int], now: float,
                 prompt: str = "", lineage: Lineage | None = None) -> int:
        if lineage is not None:
            self.lineages[entry] = lineage
        new = [k for k in sizes if (entry, k) not in self.items]
        for k in new:
            self.items[(entry, k)] = CacheItem(entry, k, partition, sizes[k], now, 0, now,
                                               prompt)
        return len(new)

    def stored_ks(self, entry: str) -> frozenset[int]:
        return frozenset(k for item_entry, k in self.items if item_entry == entry)

    def entry(self, entry: str) -> CachedEntry | None:
        ks, lineage = self.stored_ks(entry), self.lineages.get(entry)
        return CachedEntry(ks, lineage) if ks and lineage else None

    def record_hit(self, entry: str, k: int, now: float) -> int | None:
        item = self.items.get((entry, k))
        if item is None:
            return None
        self.items[(entry, k)] = replace(item, hits=item.hits + 1, last_used_at=now)
        return item.hits + 1

    def remove_item(self, entry: str, k: int) -> int | None:
        if self.items.pop((entry, k), None) is None:
            return None
        left = len(self.stored_ks(entry))
        if not left:
            self.lineages.pop(entry, None)
        return left

    def item(self, entry: str, k: int) -> CacheItem | None:
        return self.items.get((entry, k))

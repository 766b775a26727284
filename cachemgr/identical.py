"""Identical requests: the finished job whose image answers them (the exact path) and the
job generating one now (single flight), in Redis.

Keys (all under ``t2i:identical:``), by the request's digest (cachemgr.keys.identical_key):
  done:{digest}         the job id of a succeeded identical request (expires with records)
  flight:{digest}       the job id generating it now (the leader)
  followers:{leader}    set of the jobs waiting for that leader
A follower is not lost if its leader fails: the leader's worker sends every follower back
to triage when it finishes in any state, and the reconciler does the same for a follower
whose leader ended without doing so (core.reconcile).
"""

from __future__ import annotations

import redis

from core.jobstore import redis_errors

PREFIX = "t2i:identical:"

# KEYS: key. ARGV: expected value. Deletes the key only while it still holds that value.
_DELETE_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: key. ARGV: expected value (or ''), new value, ttl. Sets it if it holds the expected
# value (or nothing): returns the value it holds afterwards.
_SET_IF = """
local held = redis.call('GET', KEYS[1])
if (not held and ARGV[1] == '') or held == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return ARGV[2]
end
return held
"""

# KEYS: followers set. Returns its members and deletes it, atomically.
_TAKE_ALL = """
local members = redis.call('SMEMBERS', KEYS[1])
redis.call('DEL', KEYS[1])
return members
"""


class IdenticalRequests:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self._redis = client
        self._ttl_s = ttl_s
        self._delete_if = client.register_script(_DELETE_IF)
        self._set_if = client.register_script(_SET_IF)
        self._take_all = client.register_script(_TAKE_ALL)

    def finished(self, digest: str) -> str | None:
        with redis_errors():
            return self._redis.get(PREFIX + "done:" + digest)

    def remember(self, digest: str, job_id: str) -> None:
        with redis_errors():
            self._redis.set(PREFIX + "done:" + digest, job_id, ex=self._ttl_s)

    def forget(self, digest: str, job_id: str) -> None:
        """Drop a finished job whose image is gone (only if it is still the one named)."""
        with redis_errors():
            self._delete_if(keys=[PREFIX + "done:" + digest], args=[job_id])

    def lead(self, digest: str, job_id: str, replacing: str = "") -> str:
        """Make ``job_id`` the leader if there is none (or ``replacing`` still is: a leader
        known to have ended); returns the leader afterwards."""
        with redis_errors():
            return str(self._set_if(keys=[PREFIX + "flight:" + digest],
                                    args=[replacing, job_id, self._ttl_s]))

    def follow(self, leader: str, job_id: str) -> None:
        with redis_errors():
            pipe = self._redis.pipeline()
            pipe.sadd(PREFIX + "followers:" + leader, job_id)
            pipe.expire(PREFIX + "followers:" + leader, self._ttl_s)
            pipe.execute()

    def land(self, digest: str, leader: str) -> list[str]:
        """The leader ended: end its flight and hand back its followers (each once)."""
        with redis_errors():
            self._delete_if(keys=[PREFIX + "flight:" + digest], args=[leader])
            return sorted(self._take_all(keys=[PREFIX + "followers:" + leader]))


class InMemoryIdenticalRequests:
    """The in-memory twin, for worker logic tested without Redis."""

    def __init__(self) -> None:
        self.done: dict[str, str] = {}
        self.flights: dict[str, str] = {}
        self.followers: dict[str, set[str]] = {}

    def finished(self, digest: str) -> str | None:
        return self.done.get(digest)

    def remember(self, digest: str, job_id: str) -> None:
        self.done[digest] = job_id

    def forget(self, digest: str, job_id: str) -> None:
        if self.done.get(digest) == job_id:
            del self.done[digest]

    def lead(self, digest: str, job_id: str, replacing: str = "") -> str:
        if self.flights.get(digest, "") == replacing:
            self.flights[digest] = job_id
        return self.flights[digest]

    def follow(self, leader: str, job_id: str) -> None:
        self.followers.setdefault(leader, set()).add(job_id)

    def land(self, digest: str, leader: str) -> list[str]:
        if self.flights.get(digest) == leader:
            del self.flights[digest]
        return sorted(self.followers.pop(leader, set()))

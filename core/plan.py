"""The cache plan on a job record: triage's decision, typed, as the GPU worker reads it and
(in part) as a poller sees it. The decision itself is made in cachemgr.plan. Pure."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from core.stepcache import OFF


class Route(StrEnum):
    FULL = "full"        # from noise, all steps
    RESUME = "resume"    # from a cached latent at step K
    EXACT = "exact"      # an identical request's image: no step runs


class Reason(StrEnum):
    HIT = "hit"                          # resume from the K the similarity earned
    HOLE = "hole fallback"               # that K was evicted: resume from a smaller stored K
    BELOW_THRESHOLD = "below threshold"  # nearest cached prompt too far
    MISS = "miss"                        # nothing cached in this partition
    NO_STORED_K = "hole: no stored K"    # the match has no item at or below the K earned
    PREDICTED_MISS = "predicted miss"    # the match predictor skipped the lookup
    CACHE_OFF = "cache off"
    INDEX_UNAVAILABLE = "index unavailable"
    EXACT_REPEAT = "exact repeat"        # an identical finished request's image, copied
    IN_FLIGHT = "identical in flight"    # shares the generation of an identical queued request
    SEED_CAP = "seed-change cap"         # K capped: the latent carries another seed's noise
    LINEAGE_CAP = "lineage cap"          # K lowered: an earlier prompt in the latent's lineage
                                         # is farther from this one than the entry's own
    ADAPTER_CAP = "adapter cap"          # a LoRA job from a base-model latent: K at most the
                                         # step its LoRA starts acting at (T2I_LORA_FROM)


class SeedRule(StrEnum):
    """How a resumed job whose seed differs from the cached latent's gets its own picture
    (DDIM is deterministic once the latent at K is fixed: without a rule, a re-roll would
    return the cached image)."""

    SAME_SEED = "same seed"              # the latent carries the job's own seed: as is
    K_CAP = "k cap"                      # K capped for seed-changed hits; nothing else
    NOISE_SWAP = "noise swap"            # the cached seed's noise swapped for the job's at K
    RENOISE = "re-noise"                 # the latent noised back to an earlier step, job's noise
    STOCHASTIC_TAIL = "stochastic tail"  # the remaining steps inject the job's seeded noise


@dataclass(frozen=True)
class Reseed:
    """What the engine does to a cached latent of another seed before resuming from it."""

    rule: SeedRule
    source_seed: int        # the seed whose noise the cached latent carries
    run_from: int           # the step the job runs from (below K when re-noising)


@dataclass(frozen=True)
class Segment:
    """Steps of a cached latent that one prompt ran: from the end of the previous segment
    (or step 1) through ``until``."""

    source: str             # the generation (job id) that ran them
    prompt: str
    until: int


@dataclass(frozen=True)
class Lineage:
    """Which prompt produced which steps of a cached generation's latents, oldest first (the
    last segment is the generation's own), whose seeded noise the latents carry, and the
    step cache they were computed with (core.stepcache spec; one per partition)."""

    segments: tuple[Segment, ...]
    noise_seed: int
    step_cache: str = OFF

    @classmethod
    def own(cls, source: str, prompt: str, steps: int, seed: int,
            step_cache: str = OFF) -> Lineage:
        """A full generation's: every step its own, its own seed's noise."""
        return cls((Segment(source, prompt, steps),), seed, step_cache)

    def through(self, k: int) -> tuple[Segment, ...]:
        """The segments that made the latent after step ``k``, the last cut at ``k``."""
        kept: list[Segment] = []
        for segment in self.segments:
            kept.append(Segment(segment.source, segment.prompt, min(segment.until, k)))
            if segment.until >= k:
                break
        return tuple(kept)

    def to_dict(self) -> dict[str, Any]:
        return {"segments": [[s.source, s.prompt, s.until] for s in self.segments],
                "noise_seed": self.noise_seed, "step_cache": self.step_cache}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Lineage:
        return cls(tuple(Segment(str(source), str(prompt), int(until))
                         for source, prompt, until in data["segments"]), int(data["noise_seed"]),
                   str(data.get("step_cache", OFF)))  # lineages kept before step caches


@dataclass(frozen=True)
class CachePlan:
    """Triage's decision for one job, handed to the GPU worker on the job record."""

    route: Route
    reason: Reason
    partition: str = ""
    entry: str | None = None            # the cached generation to resume from
    k: int | None = None                # the step to resume from (after hole fallback)
    wanted_k: int | None = None         # the K the similarity earned
    similarity: float | None = None
    looked_up: bool = False             # the index was asked (not skipped, not down)
    predictor: str = ""                 # version of the match predictor consulted
    predicted_hit: bool | None = None
    audited: bool = False               # a predicted miss looked up anyway, to measure it
    table: str = ""                     # the similarity -> K table's name
    source_lineage: Lineage | None = None  # the resumed entry's (so the job can extend it)
    reseed: Reseed | None = None        # the seed rule of a resume from another seed's latent

    @property
    def steps_saved(self) -> int:
        """Denoising steps this plan does not run (of the request's N, for EXACT all N,
        which ``k`` holds)."""
        if self.route is Route.FULL or self.k is None:
            return 0
        return self.reseed.run_from if self.reseed else self.k

    def public(self) -> dict[str, Any]:
        """What a poller sees: no partition hash, no internal entry id or lineage."""
        return {"route": str(self.route), "k": self.k, "similarity": self.similarity,
                "reason": str(self.reason),
                "seed_rule": str(self.reseed.rule) if self.reseed else None}

    def to_json(self) -> str:
        data = asdict(self)
        data["source_lineage"] = self.source_lineage.to_dict() if self.source_lineage else None
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CachePlan:
        data = json.loads(text)
        lineage, reseed = data.get("source_lineage"), data.get("reseed")
        return cls(**{**data, "route": Route(data["route"]), "reason": Reason(data["reason"]),
                      "source_lineage": Lineage.from_dict(lineage) if lineage else None,
                      "reseed": Reseed(SeedRule(reseed["rule"]), reseed["source_seed"],
                                       reseed["run_from"]) if reseed else None})


FULL_CACHE_OFF = CachePlan(Route.FULL, Reason.CACHE_OFF)

"""A scene-world prompt trace that behaves like users of a real service, in the real trace's
CSV format, so ``bench.replay_live`` replays it through the stack like any trace.

    python -m quality.toy_trace --requests 400 --out bench/results/toy-trace.csv.gz

Each user starts on a theme (a scene) and then, request by request: edits one attribute
(keeping their wording, as people change one word), re-rolls the same prompt with a new
seed, rephrases it, returns to one of their earlier themes, or starts a new one. Users are
interleaved by a seeded random merge. Probabilities are options; the defaults are guesses
at a creative tool's users, not measurements.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from core.trace import seeded_merge
from quality.scenes import SIZE, Scene, caption, edit, sample_scene

ACTIONS = ("edit", "reroll", "rephrase", "revisit", "new")
FIELDS = ("channel", "seq", "user_hash", "prompt", "seed", "width", "height", "cfg", "steps")


@dataclass(frozen=True)
class Behaviour:
    edit: float = 0.40
    reroll: float = 0.20
    rephrase: float = 0.10
    revisit: float = 0.10   # the rest starts a new theme

    def weights(self) -> list[float]:
        chances = [self.edit, self.reroll, self.rephrase, self.revisit]
        return [*chances, 1.0 - sum(chances)]


def user_requests(user: str, count: int, behaviour: Behaviour,
                  rng: random.Random) -> list[tuple[str, str, int]]:
    """(user, prompt, seed) for one user's session."""
    themes: list[tuple[Scene, int]] = []   # (scene, wording seed)
    scene, wording = sample_scene(rng), rng.randrange(2**31)
    requests = []
    for _ in range(count):
        requests.append((user, caption(scene, random.Random(wording)), rng.randrange(2**31)))
        themes.append((scene, wording))
        action = rng.choices(ACTIONS, weights=behaviour.weights())[0]
        if action == "edit":
            scene = edit(scene, rng)
        elif action == "rephrase":
            wording = rng.randrange(2**31)
        elif action == "revisit":
            scene, wording = rng.choice(themes)
        elif action == "new":
            scene, wording = sample_scene(rng), rng.randrange(2**31)
        # a re-roll keeps scene and wording: only the next request's seed differs
    return requests


def toy_trace(requests: int, users: int, behaviour: Behaviour, guidance: float,
              seed: int) -> list[dict[str, object]]:
    """Rows in the real trace's format: one channel 'toy', users merged at random."""
    rng = random.Random(seed)
    per_user = [user_requests(f"user-{index}", requests // users + (index < requests % users),
                              behaviour, rng) for index in range(users)]
    return [{"channel": "toy", "seq": seq, "user_hash": user, "prompt": prompt, "seed": job_seed,
             "width": SIZE, "height": SIZE, "cfg": guidance, "steps": ""}
            for seq, (user, prompt, job_seed) in enumerate(seeded_merge(per_user, rng))]


def write(rows: list[dict[str, object]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Behaviour()
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--edit", type=float, default=defaults.edit,
                        help="chance the next request edits one attribute")
    parser.add_argument("--reroll", type=float, default=defaults.reroll,
                        help="chance it repeats the prompt with a new seed")
    parser.add_argument("--rephrase", type=float, default=defaults.rephrase,
                        help="chance it says the same scene in other words")
    parser.add_argument("--revisit", type=float, default=defaults.revisit,
                        help="chance it returns to one of the user's earlier themes")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/toy-trace.csv.gz")
    args = parser.parse_args(argv)
    behaviour = Behaviour(args.edit, args.reroll, args.rephrase, args.revisit)
    if min(behaviour.weights()) < 0:
        parser.error(f"behaviour chances must be >= 0 and sum to at most 1, got {behaviour}")
    rows = toy_trace(args.requests, args.users, behaviour, args.guidance, args.seed)
    write(rows, Path(args.out))
    print(f"{len(rows)} requests from {args.users} users -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

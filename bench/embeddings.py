"""Prompt embeddings for the replays, computed once and kept on disk per embedder.

The store is a folder of chunks (``chunk-<id>.npy`` vectors + ``chunk-<id>.json`` prompts),
keyed by prompt, so any trace slice reuses what another computed. Each finished chunk is
written atomically, so an interrupted run (the full trace takes over an hour on a 2-core
CPU) resumes where it stopped.

    python -m bench.embeddings --trace ../shared/data/sd-discord-trace.csv.gz   # warm it
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

DEFAULT_CACHE_DIR = "~/.cache/t2i/embeddings"


def load_embedder(name: str):
    from workers.embedder import load_embedder as load

    return load(name, "tiny", Path(tempfile.gettempdir()) / "t2i-replay-models")


class EmbeddingStore:
    """Prompt -> L2-normalised embedding for one embedder, on disk in resumable chunks."""

    def __init__(self, cache_dir: Path, embedder_name: str) -> None:
        self.directory = cache_dir.expanduser() / embedder_name
        self.embedder_name = embedder_name

    def _chunks(self) -> list[Path]:
        return sorted(self.directory.glob("chunk-*.json"))

    def known(self) -> dict[str, np.ndarray]:
        table: dict[str, np.ndarray] = {}
        for prompts_file in self._chunks():
            vectors = np.load(prompts_file.with_suffix(".npy"))
            table.update(zip(json.loads(prompts_file.read_text()), vectors))
        return table

    def _write_chunk(self, prompts: list[str], vectors: np.ndarray) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        stem = self.directory / f"chunk-{time.time_ns()}-{os.getpid()}"  # writers never collide
        tmp = stem.with_suffix(".tmp")
        with tmp.open("wb") as handle:
            np.save(handle, vectors, allow_pickle=False)
        os.replace(tmp, stem.with_suffix(".npy"))
        tmp.write_text(json.dumps(prompts))
        os.replace(tmp, stem.with_suffix(".json"))  # the chunk counts from here on

    def matrix(self, prompts: list[str], batch: int = 64, chunk: int = 4096) -> np.ndarray:
        """Row i is the embedding of prompts[i]; missing prompts are embedded first."""
        table = self.known()
        # In order of first use, so an interrupted run still covers a prefix of the trace.
        missing = [p for p in dict.fromkeys(prompts) if p not in table]
        if missing:
            embedder = load_embedder(self.embedder_name)
            with tqdm(total=len(missing), desc=f"embedding ({self.embedder_name})",
                      unit="prompt") as bar:
                for start in range(0, len(missing), chunk):
                    part = sorted(missing[start:start + chunk], key=len)  # little padding
                    rows = []
                    for offset in range(0, len(part), batch):
                        rows.append(embedder.embed(part[offset:offset + batch]))
                        bar.update(len(rows[-1]))
                    vectors = np.vstack(rows).astype(np.float32)
                    self._write_chunk(part, vectors)
                    table.update(zip(part, vectors))
        return np.stack([table[p] for p in prompts]) if prompts else np.zeros((0, 0), np.float32)


def main(argv: list[str] | None = None) -> int:
    from core.trace import DEFAULT_TRACE, interleaved

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default=str(DEFAULT_TRACE), help="trace CSV(.gz)")
    parser.add_argument("--limit", type=int, default=None, help="first N requests (after merge)")
    parser.add_argument("--seed", type=int, default=0, help="merge seed, as for bench.replay")
    parser.add_argument("--embedder", default="minilm", help="minilm or clip")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="embedding store")
    args = parser.parse_args(argv)
    prompts = [r.prompt for r in interleaved(Path(args.trace), args.seed, args.limit)]
    store = EmbeddingStore(Path(args.cache_dir), args.embedder)
    matrix = store.matrix(prompts)
    print(f"{len(set(prompts))} unique prompts embedded in {store.directory} "
          f"(dimension {matrix.shape[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

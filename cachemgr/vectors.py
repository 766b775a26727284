"""The vector index of cached prompts in Chroma (embedded directory or a Chroma server).

Embeddings are always passed in: Chroma never embeds text itself (that would try to
download a model). Cosine space; a lookup never leaves the job's partition.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import chromadb
import httpx
import numpy as np
from chromadb.config import Settings as ChromaSettings
from chromadb.errors import ChromaError

from core.errors import VectorIndexUnavailable

if TYPE_CHECKING:
    from core.settings import Settings


_BATCH = 1000
Vector = Sequence[float] | np.ndarray
T = TypeVar("T")


@contextlib.contextmanager
def _chroma_errors() -> Iterator[None]:
    try:
        yield
    except (ChromaError, ValueError, OSError, httpx.HTTPError, sqlite3.Error) as exc:
        raise VectorIndexUnavailable(f"Chroma failed: {exc}") from exc


def _upsert(collection: Any, **items: Any) -> None:
    collection.upsert(**items)


class VectorIndex:
    """One Chroma collection per (embedder, partition). A collection per partition rather
    than a metadata filter: a filtered top-1 query over 10k vectors took 64 ms here, an
    unfiltered one 3 ms.

    An embedded index whose directory is removed under it would go on answering reads from
    the deleted file and fail every write ("readonly database"); it is reopened instead,
    empty, and the cache sweep re-indexes the catalog's entries into it."""

    def __init__(self, connect: Callable[[], chromadb.ClientAPI], embedder: str,
                 path: Path | None = None) -> None:
        self._connect = connect
        self._path = path          # the embedded index's directory; None for a server
        self._prefix = f"prompts-{embedder}-"
        self._collections: dict[str, Any] = {}
        with _chroma_errors():
            self._client = connect()
            self._client.heartbeat()

    @classmethod
    def open(cls, path: Path | None, url: str, embedder: str) -> VectorIndex:
        """A server when ``url`` is set, else the embedded index at ``path``."""
        options = ChromaSettings(anonymized_telemetry=False)
        if url:
            parts = urlsplit(url)
            return cls(lambda: chromadb.HttpClient(
                host=parts.hostname, port=parts.port or 8000, ssl=parts.scheme == "https",
                settings=options), embedder)
        return cls(lambda: chromadb.PersistentClient(path=str(path), settings=options),
                   embedder, Path(path) if path is not None else None)

    def _reopen_if_removed(self) -> None:
        """Open the embedded index anew if its database file is gone (a stat per call)."""
        if self._path is None or (self._path / "chroma.sqlite3").exists():
            return
        with contextlib.suppress(Exception):  # the old one's files are gone: close what is left
            self._client.close()
        self._collections.clear()
        with _chroma_errors():
            self._client = self._connect()

    @classmethod
    def from_settings(cls, config: Settings, embedder: str) -> VectorIndex:
        return cls.open(config.chroma_dir, config.chroma_url, embedder)

    def _collection(self, partition: str) -> Any:
        if partition not in self._collections:
            with _chroma_errors():
                self._collections[partition] = self._client.get_or_create_collection(
                    self._prefix + partition, metadata={"hnsw:space": "cosine"},
                    embedding_function=None)
        return self._collections[partition]

    def _call(self, partition: str, operation: Callable[[Any], T]) -> T:
        """Run ``operation`` on the partition's collection. A handle cached before a Chroma
        restart or wipe fails once; it is then dropped and the collection looked up (or
        made) anew, so the caller never sees a stale handle's error."""
        self._reopen_if_removed()
        was_cached = partition in self._collections
        try:
            with _chroma_errors():
                return operation(self._collection(partition))
        except VectorIndexUnavailable:
            self._collections.pop(partition, None)
            if not was_cached:
                raise
        with _chroma_errors():
            return operation(self._collection(partition))

    def add(self, entry: str, embedding: Vector, partition: str, prompt: str,
            created_at: float) -> None:
        self._call(partition, lambda collection: collection.upsert(
            ids=[entry], embeddings=[list(map(float, embedding))],
            metadatas=[{"created_at": created_at, "prompt": prompt[:500]}]))

    def add_many(self, entries: Sequence[str], embeddings: Sequence[Vector] | np.ndarray,
                 partition: str, created_at: float) -> None:
        """Bulk insert (rebuilding an index, benchmarks), in chunks Chroma accepts."""
        entries = list(entries)
        for start in range(0, len(entries), _BATCH):
            chunk = entries[start:start + _BATCH]
            vectors = [list(map(float, e)) for e in embeddings[start:start + _BATCH]]
            metadatas = [{"created_at": created_at}] * len(chunk)
            self._call(partition, functools.partial(_upsert, ids=chunk, embeddings=vectors,
                                                    metadatas=metadatas))

    def nearest(self, embedding: Vector, partition: str,
                n: int = 1) -> list[tuple[str, float]]:
        """Up to ``n`` closest entries in ``partition`` with their cosine similarities,
        nearest first (empty if the partition is)."""
        result = self._call(partition, lambda collection: collection.query(
            query_embeddings=[list(map(float, embedding))], n_results=n, include=["distances"]))
        return [(entry, 1.0 - float(distance))
                for entry, distance in zip(result["ids"][0], result["distances"][0])]

    def delete(self, entry: str, partition: str) -> None:
        self._call(partition, lambda collection: collection.delete(ids=[entry]))

    def ids(self) -> list[tuple[str, str]]:
        """(partition, entry) of every vector of this embedder."""
        found: list[tuple[str, str]] = []
        self._reopen_if_removed()
        with _chroma_errors():
            names = [c.name for c in self._client.list_collections()]
        for name in names:
            if name.startswith(self._prefix):
                partition = name[len(self._prefix):]
                found += [(partition, entry) for entry in self._call(
                    partition, lambda collection: collection.get(include=[])["ids"])]
        return found

    def count(self) -> int:
        return len(self.ids())

"""The vector index of cached prompts in Chroma (embedded directory or a Chroma server).

Embeddings are always passed in: Chroma never embeds text itself (that would try to
download a model). Cosine space; a lookup never leaves the job's partition.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import chromadb
import httpx
from chromadb.config import Settings as ChromaSettings
from chromadb.errors import ChromaError

from core.errors import VectorIndexUnavailable

if TYPE_CHECKING:
    from celeryconfig import Settings


_BATCH = 1000
T = TypeVar("T")


@contextlib.contextmanager
def _chroma_errors() -> Iterator[None]:
    try:
        yield
    except (ChromaError, ValueError, OSError, httpx.HTTPError, sqlite3.Error) as exc:
        raise VectorIndexUnavailable(f"Chroma failed: {exc}") from exc


class VectorIndex:
    """One Chroma collection per (embedder, partition). A collection per partition rather
    than a metadata filter: a filtered top-1 query over 10k vectors took 64 ms here, an
    unfiltered one 3 ms."""

    def __init__(self, client: chromadb.ClientAPI, embedder: str) -> None:
        self._client = client
        self._prefix = f"prompts-{embedder}-"
        self._collections: dict[str, Any] = {}
        with _chroma_errors():
            client.heartbeat()

    @classmethod
    def open(cls, path: Path | None, url: str, embedder: str) -> VectorIndex:
        """A server when ``url`` is set, else the embedded index at ``path``."""
        options = ChromaSettings(anonymized_telemetry=False)
        with _chroma_errors():
            if url:
                parts = urlsplit(url)
                client = chromadb.HttpClient(host=parts.hostname, port=parts.port or 8000,
                                             ssl=parts.scheme == "https", settings=options)
            else:
                client = chromadb.PersistentClient(path=str(path), settings=options)
        return cls(client, embedder)

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

    def add(self, entry: str, embedding: Sequence[float], partition: str, prompt: str,
            created_at: float) -> None:
        self._call(partition, lambda collection: collection.upsert(
            ids=[entry], embeddings=[list(map(float, embedding))],
            metadatas=[{"created_at": created_at, "prompt": prompt[:500]}]))

    def add_many(self, entries: Sequence[str], embeddings: Sequence[Sequence[float]],
                 partition: str, created_at: float) -> None:
        """Bulk insert (rebuilding an index, benchmarks), in chunks Chroma accepts."""
        entries = list(entries)
        for start in range(0, len(entries), _BATCH):
            chunk = entries[start:start + _BATCH]
            vectors = [list(map(float, e)) for e in embeddings[start:start + _BATCH]]
            self._call(partition, lambda collection: collection.upsert(
                ids=chunk, embeddings=vectors, metadatas=[{"created_at": created_at}] * len(chunk)))

    def nearest(self, embedding: Sequence[float], partition: str,
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

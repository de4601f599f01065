"""The in-memory index the service searches: irkit's faiss Index when present, else a flat faiss one.

Rebuilt from the FeatureStore at every start (the store is the only durable state), so there is
no index file that a crash could leave out of step with the store.
"""
from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)


class SearchIndex(Protocol):
    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...
    def add(self, desc: np.ndarray) -> None: ...


class FlatIP:
    """Exact inner-product search (faiss IndexFlatIP): rows are numbered in insertion order."""

    def __init__(self, dim: int) -> None:
        import faiss

        self._index = faiss.IndexFlatIP(int(dim))

    def add(self, desc: np.ndarray) -> None:
        if len(desc):
            self._index.add(np.ascontiguousarray(desc, dtype=np.float32))

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(int(k), self._index.ntotal)
        if k <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        return self._index.search(np.ascontiguousarray(q, dtype=np.float32), k)

    def __len__(self) -> int:
        return int(self._index.ntotal)


def make_index(desc: np.ndarray, dim: int, factory: str = "Flat") -> SearchIndex:
    """An index over ``desc`` [N, dim]: ``factory`` other than Flat needs irkit.search.index."""
    if factory.lower() != "flat":
        from irkit.search.index import Index  # the project's faiss wrapper (IVF/PQ/HNSW factories)

        if len(desc) == 0:
            raise ValueError(f"index factory {factory!r} needs training data; the store is empty (use Flat)")
        return Index.build(desc, factory=factory)
    index = FlatIP(dim)
    index.add(desc)
    return index

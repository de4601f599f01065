"""Re-ranking and match explanation for the service, when the loaded model has a re-ranker.

A model "has a re-ranker" when it carries a ``reranker`` module (CVNet presets do) and computes
re-rank maps, and the store was extracted with those maps. Otherwise both features report why they
are unavailable (the API answers 501 with that reason) instead of failing deep inside.

Scoring reuses :class:`irkit.search.rerank.CVNetScorer` (prepared database maps in an LRU cache);
its cache is not thread-safe and is keyed by store row, so calls are serialised by a lock and the
cache is dropped whenever rows are renumbered (a removal).
"""
from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from irkit.models.base import GlobalModel

log = logging.getLogger(__name__)

#: final = global + LAMBDA * P(same instance), as irkit.search.rerank does (its default)
DEFAULT_LAMBDA = 0.5


class Reranker:
    """CVNet scoring of a shortlist and the explanation picture, or a clear reason why not."""

    def __init__(self, model: GlobalModel, store: Any, with_maps: bool, lam: float = DEFAULT_LAMBDA,
                 cache_bytes: int = 256 << 20) -> None:
        self.model = model
        self.store = store
        self.lam = float(lam)
        self._lock = threading.Lock()
        self._scorer = None
        module = getattr(model, "reranker", None)
        if module is None or not model.has_rerank_map:
            self.reason = (f"model {model.preset_name!r} has no re-ranker; serve a CVNet preset "
                           "(e.g. cvnet-r50) over a store extracted with --maps")
        elif not (with_maps and store.has_maps):
            self.reason = (f"the store was extracted without re-rank maps; re-extract it with --maps to "
                           f"re-rank with {model.preset_name!r}")
        else:
            self.reason = ""
            from irkit.search.rerank import CVNetScorer

            self._scorer = CVNetScorer(module, store, cache_bytes=cache_bytes)

    @property
    def available(self) -> bool:
        return self._scorer is not None

    def forget(self) -> None:
        """Drop cached database maps (call after store rows were renumbered)."""
        if self._scorer is not None:
            with self._lock:
                self._scorer.clear_cache()

    def score(self, query_map: np.ndarray, rows: np.ndarray, global_scores: np.ndarray) -> np.ndarray:
        """``global + lam * P(same)`` for the shortlist ``rows`` (float64, same order)."""
        assert self._scorer is not None
        with self._lock:
            p = self._scorer.score(query_map, np.asarray(rows, dtype=np.int64))
        return np.asarray(global_scores, np.float64) + self.lam * np.asarray(p, np.float64)

    def explain(self, query_img: np.ndarray, db_img: np.ndarray) -> bytes:
        """PNG of the two images with their strongest CVNet correspondences."""
        from irkit.search.explain import explain_png

        with self._lock:
            return explain_png(self.model, query_img, db_img)

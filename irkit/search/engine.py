"""Searching a feature store from Python or the CLI: the store's own model (checked against the
config the store was built with), its faiss index, query expansion and re-ranking of the shortlist."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from irkit.errors import ConfigError, StoreError
from irkit.extract import embed_arrays, model_config
from irkit.io.images import crop_bbx, load_image
from irkit.models.base import GlobalModel

log = logging.getLogger(__name__)


class _ShortlistScorer:
    """Adapts a scorer over store rows to the re-rank pipeline run on a shortlist."""

    def __init__(self, inner: Any, rows: np.ndarray) -> None:
        self.inner, self.rows = inner, rows

    def score(self, query: Any, candidates: np.ndarray) -> np.ndarray:
        return self.inner.score(query, self.rows[np.asarray(candidates)])


class _SpatialStoreScorer:
    """Spatial verification of a query image against store rows (their image files)."""

    def __init__(self, paths: Sequence[str]) -> None:
        from irkit.search.spatial import SpatialVerifier

        self.paths = paths
        self.verifier = SpatialVerifier()

    def score(self, query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        from irkit.search.spatial import inlier_score

        fq = self.verifier.features(query)
        return inlier_score(self.verifier.score_candidates(fq, [self.verifier.features(self.paths[i]) for i in candidates]))


class SearchEngine:
    """A store, the model that built it, and its index."""

    def __init__(self, store: Any, model: GlobalModel, index: Any) -> None:
        self.store, self.model, self.index = store, model, index
        config = store.meta.get("config", {})
        self.scales = tuple(config.get("scales") or model.default_scales)

    @classmethod
    def open(cls, store_dir: str | Path, weights: str | Path | None = None, device: str | None = "cpu",
             factory: str = "Flat", model: GlobalModel | None = None) -> "SearchEngine":
        """Open ``store_dir``; build its model preset (with ``weights``) unless ``model`` is given, and
        refuse a model whose configuration differs from the one that built the store."""
        from irkit.models.registry import build_model
        from irkit.search.index import load_or_build
        from irkit.store import FeatureStore, config_hash

        store = FeatureStore.open(store_dir)
        if len(store) == 0:
            raise StoreError(f"store {store_dir} is empty; run `irkit extract` first")
        if model is None:
            model = build_model(store.meta["model"], weights=weights, device=device)
        stored = store.meta.get("config", {})
        mine = model_config(model, stored.get("scales") or model.default_scales, stored.get("rerank_maps", False))
        if config_hash(mine) != store.meta.get("config_hash"):
            raise StoreError(f"store {store_dir} was built with {stored.get('preset')} weights "
                             f"{stored.get('weights')}, but the model given is {mine.get('preset')} with weights "
                             f"{mine.get('weights')}; pass the same --weights the store was extracted with")
        return cls(store, model, load_or_build(store, factory))

    def embed(self, img: np.ndarray, box: Sequence[float] | None = None) -> np.ndarray:
        """Descriptor [D] of a uint8 RGB image (cropped to ``box`` first), at the store's scales."""
        if box is not None:
            img = crop_bbx(img, box)
        return embed_arrays(self.model, [img], self.scales)[0]

    def search(self, img: np.ndarray, k: int = 100, *, box: Sequence[float] | None = None, qe: str = "none",
               qe_k: int = 2, qe_alpha: float = 3.0, rerank: str = "none", topk: int = 100,
               lam: float = 0.5, rescore: int = 0) -> list[dict[str, Any]]:
        """Ranked hits ``{"id", "path", "score", "global"}`` for one query image.

        ``rescore`` > 0: an approximate (e.g. IVF-PQ) index returns that many candidates, re-scored
        exactly with the store's descriptors (recovers the quantisation loss; no effect on Flat)."""
        from irkit.search import qe as qe_mod

        if box is not None:
            img = crop_bbx(img, box)
        q = embed_arrays(self.model, [img], self.scales)
        if qe != "none" and qe_k > 0:
            db = self.store.descriptors()
            q = qe_mod.aqe(q, db, qe_k) if qe == "aqe" else qe_mod.alpha_qe(q, db, qe_k, qe_alpha)
        depth = min(max(k, topk if rerank != "none" else 0), len(self.store))
        scores, rows = self.index.search(q, depth, rescore=rescore > 0, rescore_k=rescore)
        keep = rows[0] >= 0
        scores, rows = scores[0][keep], rows[0][keep]
        final = scores.astype(np.float64)
        if rerank != "none" and len(rows):
            final = self._rerank(img, scores, rows, rerank, topk, lam)
        order = np.argsort(-final, kind="stable")[:k]
        ids, paths = self.store.ids, self.store.paths
        return [{"id": ids[rows[i]], "path": paths[rows[i]], "score": float(final[i]), "global": float(scores[i])}
                for i in order]

    def search_file(self, path: str | Path, k: int = 100, **options: Any) -> list[dict[str, Any]]:
        return self.search(load_image(path), k, **options)

    def _rerank(self, img: np.ndarray, scores: np.ndarray, rows: np.ndarray, method: str, topk: int,
                lam: float) -> np.ndarray:
        """Final scores of the shortlist: global + lam * rerank for its first ``topk`` entries."""
        from irkit.search.rerank import rerank

        if method == "cvnet":
            query = self._query_map(img)
            from irkit.search.rerank import CVNetScorer

            inner = CVNetScorer(self.model.reranker, self.store)
        elif method == "spatial":
            query, inner = img, _SpatialStoreScorer(self.store.paths)
        else:
            raise ConfigError(f"unknown re-ranking {method!r}; use none, cvnet or spatial")
        out = rerank(scores[None].astype(np.float32), _ShortlistScorer(inner, rows), k=topk, lam=lam,
                     queries=[query])
        final = scores.astype(np.float64)
        for sub, value in out.scored[0].items():
            final[sub] += lam * value
        return final

    @torch.inference_mode()
    def _query_map(self, img: np.ndarray) -> np.ndarray:
        if getattr(self.model, "reranker", None) is None or not self.store.has_maps:
            raise ConfigError("CVNet re-ranking needs a cvnet-* model and a store extracted with --maps")
        from irkit.extract import scaled_inputs

        x = scaled_inputs(self.model, img, (1.0,))[0][None].to(next(self.model.parameters()).device)
        return self.model.rerank_map(x)[0].float().cpu().numpy()

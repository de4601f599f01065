"""The one search engine: a feature store, the model that built it, and the store's index.

``irkit search``, the Python API (``irkit.SearchEngine``) and the HTTP service all search through
this class, so the same query with the same options gives the same ids and scores everywhere. The
steps, each implemented once elsewhere and only called here: embed (``irkit.extract``), query
expansion (``irkit.search.qe``), search (``irkit.search.index.Index``, opened by ``open_index``),
re-ranking (``irkit.search.rerank``: CVNet or spatial verification) and the mix of scores.
The service adds only what a service needs around it (auth, limits, locking, uploads, the page).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from irkit.errors import ConfigError, StoreError
from irkit.extract import check_scales, embed_tensors, holds_raw_maps, model_config, scaled_inputs
from irkit.io.images import crop_bbx, load_image
from irkit.models.base import GlobalModel
from irkit.models.registry import build_model
from irkit.ranking import Ranking
from irkit.search import qe as qe_mod
from irkit.search.index import Index
from irkit.search.indexing import open_index
from irkit.search.milvus_index import MilvusIndex
from irkit.search.rerank import CVNetScorer, rerank
from irkit.search.spatial import FileSpatialScorer, SpatialVerifier
from irkit.store import FeatureStore, config_hash

log = logging.getLogger(__name__)

QE_METHODS = ("none", "aqe", "alpha")
RERANK_METHODS = ("none", "cvnet", "spatial")


@dataclass
class SearchOptions:
    """How one search runs; the defaults are those of every caller (CLI, API, HTTP).

    ``qe``: none | aqe | alpha over the ``qe_k`` nearest neighbours (``qe_alpha`` for alpha-QE);
    ``rerank``: none | cvnet | spatial on the first ``topk`` results, final = global + ``lam`` *
    re-rank score; ``rescore`` > 0: an approximate index's top ``rescore`` re-scored exactly (None:
    the depth saved with the index by `irkit index --max-memory`, else 0 = off)."""

    k: int = 100
    qe: str = "none"
    qe_k: int = 2
    qe_alpha: float = 3.0
    rerank: str = "none"
    topk: int = 100
    lam: float = 0.5
    rescore: int | None = None

    def __post_init__(self) -> None:
        if self.qe not in QE_METHODS:
            raise ConfigError(f"unknown query expansion {self.qe!r}; use one of {QE_METHODS}")
        if self.rerank not in RERANK_METHODS:
            raise ConfigError(f"unknown re-ranking {self.rerank!r}; use one of {RERANK_METHODS}")
        for name in ("k", "topk"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.qe_k < 0 or (self.rescore or 0) < 0 or self.qe_alpha < 0:
            raise ConfigError("qe_k, qe_alpha and rescore must be >= 0")
        if not np.isfinite(self.lam):
            raise ConfigError(f"lambda must be a finite number, got {self.lam}")


class _ShortlistScorer:
    """Adapts a scorer over store rows to the re-rank pipeline run on one query's shortlist."""

    def __init__(self, inner: Any, rows: np.ndarray) -> None:
        self.inner, self.rows = inner, rows

    def score(self, query: Any, candidates: np.ndarray) -> np.ndarray:
        return self.inner.score(query, self.rows[np.asarray(candidates)])


class SearchEngine:
    """A store, the model that built it, and its index (see the module docstring)."""

    def __init__(self, store: FeatureStore, model: GlobalModel, index: Index | MilvusIndex) -> None:
        self.store, self.model, self.index = store, model, index
        self.scales = check_scales((store.meta.get("config") or {}).get("scales"), model)
        self.with_maps = bool(store.has_maps or (store.meta.get("config") or {}).get("rerank_maps"))
        self._cvnet: CVNetScorer | None = None
        self._spatial: FileSpatialScorer | None = None
        self._scorer_lock = threading.Lock()  # the scorers' caches are not thread-safe
        self._listing: tuple[Any, list[str], list[str]] = (None, [], [])

    @classmethod
    def open(cls, store_dir: str | Path, weights: str | Path | None = None, device: str | None = "cpu",
             factory: str | None = None, model: GlobalModel | None = None, check_config: bool = True) -> "SearchEngine":
        """Open ``store_dir`` and its index (the one saved there; ``factory`` asks for another).

        Builds the store's model preset (with ``weights``) unless ``model`` is given, and refuses a
        model whose configuration differs from the one that built the store."""
        store = FeatureStore.open(store_dir)
        if model is None:
            model = build_model(store.meta["model"], weights=weights, device=device)
        check_model(store, model, check_config)
        index = open_index(store, factory)
        return cls(store, model, index)

    # ------------------------------------------------------------------ embedding
    def embed(self, img: np.ndarray, box: Sequence[float] | None = None) -> np.ndarray:
        """Descriptor [D] of a uint8 RGB image (cropped to ``box`` first) at the store's scales."""
        return self.embed_with_map(crop_bbx(img, box) if box is not None else img, with_map=False)[0]

    def embed_with_map(self, img: np.ndarray, with_map: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Descriptor [D] and, when ``with_map``, the re-rank map of the scale-1 input in the store's
        format (CVNet's prepared levels, or raw maps in older stores), from one forward pass per scale."""
        map_index = None
        if with_map:
            map_index = next((i for i, s in enumerate(self.scales) if abs(s - 1.0) < 1e-9), None)
            if map_index is None:
                raise ConfigError("CVNet re-ranking needs the scale 1.0 among the store's scales")
        desc, maps = embed_tensors(self.model, [scaled_inputs(self.model, img, self.scales)],
                                   with_maps=with_map, map_scale_index=map_index,
                                   raw_maps=with_map and holds_raw_maps(self.store, self.model))
        return desc[0], (maps[0] if maps else None)

    # ------------------------------------------------------------------ search
    def search(self, img: np.ndarray | None = None, k: int | None = None, *, id: str | None = None,
               box: Sequence[float] | None = None, options: SearchOptions | None = None,
               **kwargs: Any) -> list[dict[str, Any]]:
        """Ranked hits ``{"id", "path", "score", "global", "stage"}`` for one query: an image (uint8
        RGB) or the ``id`` of an indexed image, optionally cropped to ``box``. Options are a
        :class:`SearchOptions` or its fields as keywords."""
        opts = options or SearchOptions(**kwargs)
        if options is not None and kwargs:
            raise ConfigError("give options either as SearchOptions or as keywords, not both")
        if k is not None:
            opts = SearchOptions(**{**asdict(opts), "k": k})
        if (img is None) == (id is None):
            raise ConfigError("give one query: an image or the id of an indexed image")
        if opts.rerank == "cvnet":
            self._check_cvnet()
        if id is not None:
            row = self.row_of(id)
            if box is None:  # the stored descriptor and map: no need to run the model
                qmap = self.store.get_map(row) if opts.rerank == "cvnet" else None
                image = self._image_of(row) if opts.rerank == "spatial" else None
                return self.search_descriptor(self.store.take([row])[0], opts, query_image=image, query_map=qmap)
            img = self._image_of(row)
        if box is not None:
            img = crop_bbx(img, box)
        qdesc, qmap = self.embed_with_map(img, with_map=opts.rerank == "cvnet")
        return self.search_descriptor(qdesc, opts, query_image=img, query_map=qmap)

    def search_descriptor(self, qdesc: np.ndarray, options: SearchOptions | None = None, *,
                          query_image: np.ndarray | None = None, query_map: np.ndarray | None = None
                          ) -> list[dict[str, Any]]:
        """The steps after embedding: QE, index search, re-ranking, mixing, sorting."""
        opts = options or SearchOptions()
        if len(self.index) == 0:
            return []
        q = np.asarray(qdesc, np.float32).reshape(1, -1)
        used_qe = opts.qe != "none" and opts.qe_k > 0
        if used_qe:  # the neighbours' vectors only (a 1M-image store is never copied whole)
            s, r = self.index.search(q, min(opts.qe_k, len(self.index)))
            found = r[0] >= 0
            near = self.store.take(r[0][found])
            neighbours = (s[:, found], np.arange(len(near))[None])
            q = (qe_mod.aqe(q, near, len(near), neighbours=neighbours) if opts.qe == "aqe"
                 else qe_mod.alpha_qe(q, near, len(near), opts.qe_alpha, neighbours=neighbours))
        depth = min(max(opts.k, opts.topk if opts.rerank != "none" else 0), len(self.index))
        rescore = opts.rescore if opts.rescore is not None else int(self.index.meta.get("rescore_k") or 0)
        scores, rows = self.index.search(q, depth, rescore=rescore > 0, rescore_k=rescore)
        keep = rows[0] >= 0
        scores, rows = scores[0][keep].astype(np.float64), rows[0][keep]
        final, stage = scores.copy(), np.full(len(rows), "qe" if used_qe else "global", dtype=object)
        order = np.arange(len(rows))
        if opts.rerank != "none" and len(rows):
            order, final, scored = self._rerank(scores, rows, opts, query_image, query_map)
            stage[list(scored)] = opts.rerank
        ids, paths = self._ids_paths()
        return [{"id": ids[rows[i]], "path": paths[rows[i]], "score": float(final[i]),
                 "global": float(scores[i]), "stage": str(stage[i])} for i in order[:opts.k]]

    def _ids_paths(self) -> tuple[list[str], list[str]]:
        """The store's ids and paths, copied once per store generation (not once per search)."""
        version = (self.store.uid, self.store.generation, len(self.store))
        if self._listing[0] != version:
            self._listing = (version, self.store.ids, self.store.paths)
        return self._listing[1], self._listing[2]

    def _rerank(self, scores: np.ndarray, rows: np.ndarray, opts: SearchOptions, image: np.ndarray | None,
                qmap: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, dict[int, float]]:
        """(order, final scores, {shortlist position: re-rank score}) from the shared re-rank pipeline."""
        if opts.rerank == "cvnet":
            if qmap is None:
                raise ConfigError("CVNet re-ranking needs the query's re-rank map")
            query, inner = qmap, self._cvnet_scorer()
        else:
            if image is None:
                raise ConfigError("spatial verification needs the query image")
            query, inner = image, self._spatial_scorer()
        with self._scorer_lock:
            out = rerank(scores[None].astype(np.float32), _ShortlistScorer(inner, rows), k=opts.topk,
                         lam=opts.lam, queries=[query])
        final = scores.copy()
        for pos, value in out.scored[0].items():
            final[pos] += opts.lam * value
        return out.ranks["plain"][:, 0], final, out.scored[0]

    def _check_cvnet(self) -> None:
        reason = self.cvnet_unavailable()
        if reason:
            raise ConfigError(reason)

    def cvnet_unavailable(self) -> str:
        """Why CVNet re-ranking cannot run on this engine ("" when it can)."""
        if getattr(self.model, "reranker", None) is None or not self.model.has_rerank_map:
            return (f"model {self.model.preset_name!r} has no CVNet re-ranker; use a cvnet-* preset "
                    "(e.g. cvnet-r50) over a store extracted with --maps, or --rerank spatial")
        if not (self.with_maps and self.store.has_maps):
            return (f"the store was extracted without re-rank maps; re-extract it with --maps to re-rank "
                    f"with {self.model.preset_name!r}")
        return ""

    def _cvnet_scorer(self) -> CVNetScorer:
        if self._cvnet is None:
            self._cvnet = CVNetScorer(self.model.reranker, self.store, cache_bytes=256 << 20)
        return self._cvnet

    def _spatial_scorer(self) -> FileSpatialScorer:
        if self._spatial is None:
            self._spatial = FileSpatialScorer([], self.store.paths, verifier=SpatialVerifier(cache_size=512))
        self._spatial.db_paths = self.store.paths
        return self._spatial

    def search_file(self, path: str | Path, k: int | None = None, **options: Any) -> list[dict[str, Any]]:
        return self.search(load_image(path), k, **options)

    def search_files(self, paths: Sequence[str | Path], options: SearchOptions | None = None,
                     query_ids: Sequence[str] | None = None,
                     boxes: Sequence[Sequence[float] | None] | None = None) -> Ranking:
        """Search several query files; the :class:`~irkit.ranking.Ranking` (query id = file stem)."""
        opts = options or SearchOptions()
        ids = list(query_ids) if query_ids is not None else [Path(p).stem for p in paths]
        boxes = list(boxes) if boxes is not None else [None] * len(paths)
        hits = [self.search(load_image(p), box=b, options=opts) for p, b in zip(paths, boxes)]
        return Ranking.from_hits(ids, hits, {"store": str(self.store.root), "model": self.model.preset_name,
                                             "options": asdict(opts), "index": self.index.describe()})

    # ------------------------------------------------------------------ rows and images
    def row_of(self, image_id: str) -> int:
        if image_id not in self.store:
            raise StoreError(f"no indexed image has id {image_id!r}")
        return self.store.index_of(image_id)

    def _image_of(self, row: int) -> np.ndarray:
        return load_image(self.store.paths[row])

    # ------------------------------------------------------------------ writes
    def add(self, ids: Sequence[str], paths: Sequence[str], descriptors: np.ndarray,
            maps: Sequence[np.ndarray] | None = None) -> None:
        """Commit to the store (durable first), then add to the index by id: no rebuild, no retraining."""
        self.store.add(ids, paths, descriptors, maps=maps if self.with_maps else None)
        self.index.add(np.asarray(descriptors, np.float32), list(ids))

    def remove(self, ids: Sequence[str]) -> None:
        """Remove from the store, then from the index (by id); cached maps keyed by row are dropped."""
        self.store.remove(ids)
        self.index.remove(list(ids))
        with self._scorer_lock:
            if self._cvnet is not None:
                self._cvnet.clear_cache()

    def save_index(self) -> None:
        """Persist the index beside the store (the service calls it; the store stays the truth)."""
        path = self.index.meta.get("path")
        if path and isinstance(self.index, Index):  # a Milvus collection is saved by Milvus itself
            try:
                self.index.save(path, store=self.store)
            except OSError as exc:
                log.warning("cannot save the index to %s (%s); it is rebuilt from the store next time", path, exc)

    def describe(self) -> dict[str, Any]:
        return {"store": str(self.store.root), "images": len(self.store), "model": self.model.preset_name,
                "scales": list(self.scales), "index": self.index.describe()}


def check_model(store: FeatureStore, model: GlobalModel, check_config: bool = True) -> None:
    """StoreError unless ``model`` is the preset (and configuration) that built ``store``."""
    meta = store.meta
    if meta.get("model") != model.preset_name:
        raise StoreError(f"store {store.root} was extracted with model {meta.get('model')!r}, not "
                         f"{model.preset_name!r}; use --model {meta.get('model')}")
    if not check_config:
        return
    stored = meta.get("config") or {}
    mine = model_config(model, check_scales(stored.get("scales"), model), bool(stored.get("rerank_maps")))
    if config_hash(mine) != meta.get("config_hash"):
        diff = sorted(k for k in set(mine) | set(stored) if mine.get(k) != stored.get(k))
        raise StoreError(f"store {store.root} was extracted with another configuration of {model.preset_name} "
                         f"(differs in {', '.join(diff) or 'hash'}: weights {stored.get('weights')} vs "
                         f"{mine.get('weights')}); use the same --weights and scales it was extracted with")


__all__ = ["SearchEngine", "SearchOptions", "check_model", "QE_METHODS", "RERANK_METHODS"]

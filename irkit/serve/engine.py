"""The search engine behind the HTTP service: model + feature store + in-memory index.

Why this shape: the FeatureStore is the only thing on disk that matters. Its adds are atomic, so
the in-memory index is always rebuilt from it at start-up (a ``kill -9`` during an add can never
leave an index that disagrees with the store). Searches take the read side of a readers-writer
lock; adds embed their images *outside* the lock and only hold the write side for the store commit
and the index append, so searches keep flowing while images are being added.
"""
from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

import numpy as np
from PIL import Image

from irkit.errors import ImageError, StoreError
from irkit.extract import check_scales, embed_tensors, model_config, scaled_inputs
from irkit.io.images import DEFAULT_MAX_PIXELS, crop_bbx, load_image
from irkit.models.base import GlobalModel
from irkit.serve.concurrency import RWLock
from irkit.serve.errors import BadRequest, Conflict, NotFound, Unavailable
from irkit.serve.index import make_index
from irkit.serve.rerank import Reranker
from irkit.serve.safety import check_id
from irkit.utils import atomic_write_bytes

log = logging.getLogger(__name__)

UPLOADS_DIR = "uploads"
_EXT = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}


@dataclass
class Limits:
    """Request limits: bytes per body, pixels per image, results per search, images per add."""

    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_k: int = 200
    max_images_per_add: int = 32
    rerank_shortlist: int = 100
    qe_k: int = 5
    qe_alpha: float = 3.0
    thumb_size: int = 256
    thumb_cache: int = 512


@dataclass
class Query:
    """One search: either an uploaded image (pixels) or an indexed id, optionally cropped to ``box``."""

    image: np.ndarray | None = None
    id: str | None = None
    box: tuple[float, float, float, float] | None = None
    k: int = 10
    rerank: bool = False
    qe: bool = False


@dataclass
class Hit:
    id: str
    score: float
    global_score: float
    rank: int

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "id": self.id, "score": round(self.score, 6),
                "global_score": round(self.global_score, 6), "thumbnail": thumbnail_url(self.id),
                "explain": explain_url(self.id)}


@dataclass
class SearchResult:
    hits: list[Hit]
    reranked: bool
    qe: bool
    timings_ms: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"results": [h.as_dict() for h in self.hits], "reranked": self.reranked, "qe": self.qe,
                "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()}}


def thumbnail_url(image_id: str) -> str:
    return f"/images/{quote(image_id, safe='/')}/thumbnail"


def explain_url(image_id: str) -> str:
    return f"/images/{quote(image_id, safe='/')}/explain"


class Engine:
    """Model, store and index with the locking that makes concurrent search + add safe."""

    def __init__(self, store_dir: str | Path, model: GlobalModel, limits: Limits | None = None,
                 index_factory: str = "Flat", check_config: bool = True) -> None:
        from irkit.store import FeatureStore, config_hash

        self.limits = limits or Limits()
        self.model = model
        self.store_dir = Path(store_dir)
        self.store = FeatureStore.open(self.store_dir)
        meta = self.store.meta
        if meta.get("model") != model.preset_name:
            raise StoreError(f"store {self.store_dir} was extracted with model {meta.get('model')!r} but the "
                             f"server loaded {model.preset_name!r}; pass --model {meta.get('model')}")
        cfg = meta.get("config") or {}
        self.scales = check_scales(cfg.get("scales"), model)
        self.with_maps = bool(self.store.has_maps or cfg.get("rerank_maps"))
        if check_config:
            mine = model_config(model, self.scales, self.with_maps)
            if config_hash(mine) != meta.get("config_hash"):
                diff = sorted(k for k in set(mine) | set(cfg) if mine.get(k) != cfg.get(k))
                raise StoreError(f"store {self.store_dir} was extracted with a different model configuration "
                                 f"(differs in {', '.join(diff) or 'hash'}); serve it with the same preset, "
                                 "weights and scales it was extracted with")
        self.index_factory = index_factory
        self.lock = RWLock()
        self._write_mutex = threading.Lock()   # one add/remove at a time (embedding included)
        self.reranker = Reranker(model, self.store, self.with_maps)
        self._thumbs: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._thumb_lock = threading.Lock()
        self.started = time.time()
        self.counters = {"searches": 0, "adds": 0, "removes": 0}
        self._count_lock = threading.Lock()
        self.uploads = self.store_dir / UPLOADS_DIR
        self._rebuild()
        self._clean_orphan_uploads()

    # ------------------------------------------------------------------ index
    def _rebuild(self) -> None:
        """Index rows = store rows; called at start and after removals (tombstones shift rows)."""
        desc = np.ascontiguousarray(self.store.descriptors(), dtype=np.float32)
        self.ids = self.store.ids
        self.paths = self.store.paths
        self.index = make_index(desc, self.store.dim, self.index_factory)
        log.info("index over %d images (dim %d, %s)", len(self.ids), self.store.dim, self.index_factory)

    def _clean_orphan_uploads(self) -> None:
        """Uploaded files whose add never committed (server killed mid-add) are deleted."""
        if not self.uploads.is_dir():
            return
        known = {Path(p).name for p in self.paths}
        for p in self.uploads.iterdir():
            if p.is_file() and p.name not in known:
                log.warning("removing orphan upload %s (its add did not complete)", p.name)
                p.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self.ids)

    def row_of(self, image_id: str) -> int:
        check_id(image_id)
        if image_id not in self.store:
            raise NotFound(f"no indexed image has id {image_id!r}")
        return self.store.index_of(image_id)

    # ------------------------------------------------------------------ embedding
    def embed(self, img: np.ndarray, with_map: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Descriptor [D] (and re-rank map [C,h,w] when asked and available) of one RGB image."""
        inputs = [scaled_inputs(self.model, img, self.scales)]
        map_index = None
        if with_map:
            map_index = next((i for i, s in enumerate(self.scales) if abs(s - 1.0) < 1e-9), None)
            if map_index is None:
                raise Unavailable("re-ranking needs the scale 1.0 among the store's scales")
        desc, maps = embed_tensors(self.model, inputs, with_maps=with_map, map_scale_index=map_index)
        return desc[0], (maps[0] if maps else None)

    def image_of(self, row: int) -> np.ndarray:
        path = self.paths[row]
        try:
            return load_image(path, max_pixels=DEFAULT_MAX_PIXELS)
        except ImageError as err:
            raise NotFound(f"the image file of id {self.ids[row]!r} is missing or unreadable on the server") \
                from err

    # ------------------------------------------------------------------ search
    def check_k(self, k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, int):
            raise BadRequest(f"k must be an integer, got {k!r}")
        if not 1 <= k <= self.limits.max_k:
            raise BadRequest(f"k must be between 1 and {self.limits.max_k}, got {k}")
        return k

    def search(self, q: Query) -> SearchResult:
        """Rank the index for one query; runs in the inference pool (it may run the model)."""
        t0 = time.perf_counter()
        k = self.check_k(q.k)
        if q.rerank and not self.reranker.available:
            raise Unavailable(f"re-ranking is unavailable: {self.reranker.reason}")
        timings: dict[str, float] = {}
        qmap = None
        qrow = None
        if q.image is not None:
            img = crop_bbx(q.image, q.box) if q.box is not None else q.image
            qdesc, qmap = self.embed(img, with_map=q.rerank)
        else:
            with self.lock.read():
                qrow = self.row_of(q.id)  # type: ignore[arg-type]
                if q.box is None:
                    qdesc = self.store.take([qrow])[0]
                    qmap = self.store.get_map(qrow) if q.rerank else None
                else:
                    img = None
            if q.box is not None:
                img = crop_bbx(self.image_of(qrow), q.box)
                qdesc, qmap = self.embed(img, with_map=q.rerank)
        timings["embed"] = (time.perf_counter() - t0) * 1000
        t1 = time.perf_counter()
        with self.lock.read():
            n = len(self.ids)
            if n == 0:
                return SearchResult([], False, q.qe, timings)
            query = qdesc[None, :].astype(np.float32)
            if q.qe:
                query = self._alpha_qe(query)
            depth = min(n, max(k, self.limits.rerank_shortlist) if q.rerank else k)
            scores, rows = self.index.search(query, depth)
            scores, rows = scores[0], rows[0]
            keep = rows >= 0
            scores, rows = scores[keep], rows[keep]
            timings["search"] = (time.perf_counter() - t1) * 1000
            final = scores.astype(np.float64)
            if q.rerank and len(rows):
                t2 = time.perf_counter()
                final = self.reranker.score(qmap, rows, scores)
                timings["rerank"] = (time.perf_counter() - t2) * 1000
            order = np.argsort(-final, kind="stable")[:k]
            hits = [Hit(self.ids[int(rows[i])], float(final[i]), float(scores[i]), r + 1)
                    for r, i in enumerate(order)]
        self._count("searches")
        timings["total"] = (time.perf_counter() - t0) * 1000
        return SearchResult(hits, bool(q.rerank), bool(q.qe), timings)

    def _alpha_qe(self, query: np.ndarray) -> np.ndarray:
        """alpha-QE over the index's nearest neighbours (irkit.search.qe)."""
        from irkit.search.qe import alpha_qe

        k = min(self.limits.qe_k, len(self.ids))
        neighbours = self.index.search(query, k)
        return alpha_qe(query, self.store.descriptors(), k, self.limits.qe_alpha, neighbours=neighbours)

    # ------------------------------------------------------------------ writes
    def add(self, images: Sequence[tuple[str, bytes, np.ndarray, str]]) -> list[str]:
        """Add (id, original bytes, pixels, sniffed format) tuples; returns the ids added.

        The model runs before the write lock is taken; the original bytes are written (atomically)
        under ``uploads/`` and the descriptors committed to the store in one atomic add."""
        with self._write_mutex:
            ids = [i for i, *_ in images]
            if len(set(ids)) != len(ids):
                raise BadRequest(f"the same id is given twice in one request: {sorted(set(i for i in ids if ids.count(i) > 1))[:5]}")
            taken = [i for i in ids if i in self.store]
            if taken:
                raise Conflict(f"id(s) already indexed: {taken[:5]}; delete them first or choose other ids")
            descs, maps = [], []
            for _, _, img, _ in images:
                d, m = self.embed(img, with_map=self.with_maps)
                descs.append(d)
                maps.append(m)
            self.uploads.mkdir(parents=True, exist_ok=True)
            paths = []
            for image_id, data, _, fmt in images:
                name = hashlib.sha256(image_id.encode("utf-8")).hexdigest()[:32] + _EXT.get(fmt, ".img")
                path = self.uploads / name
                atomic_write_bytes(path, data)
                paths.append(str(path.resolve()))
            desc = np.stack(descs).astype(np.float32)
            with self.lock.write():
                self.store.add(ids, paths, desc, maps=maps if self.with_maps else None)
                self.index.add(desc)
                self.ids = self.ids + ids
                self.paths = self.paths + paths
            self._count("adds", len(ids))
            log.info("added %d image(s): %s", len(ids), ids[:5])
            return ids

    def remove(self, image_id: str) -> None:
        with self._write_mutex:
            self.row_of(image_id)
            with self.lock.write():
                row = self.store.index_of(image_id)
                path = Path(self.paths[row])
                self.store.remove([image_id])
                self._rebuild()
                self.reranker.forget()
            if path.parent.resolve() == self.uploads.resolve():
                path.unlink(missing_ok=True)   # only files this server wrote; never the user's own
            with self._thumb_lock:
                for key in [k for k in self._thumbs if k[0] == image_id]:
                    del self._thumbs[key]
            self._count("removes")

    def _count(self, name: str, n: int = 1) -> None:
        with self._count_lock:
            self.counters[name] += n

    # ------------------------------------------------------------------ pictures
    def thumbnail(self, image_id: str) -> bytes:
        """JPEG thumbnail (longest side ``limits.thumb_size``), cached in memory (LRU)."""
        with self.lock.read():
            row = self.row_of(image_id)
            path = self.paths[row]
        key = (image_id, path)
        with self._thumb_lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        try:
            img = load_image(path, max_pixels=DEFAULT_MAX_PIXELS)
        except ImageError as err:
            raise NotFound(f"the image file of id {image_id!r} is missing or unreadable on the server") from err
        pil = Image.fromarray(img)
        pil.thumbnail((self.limits.thumb_size, self.limits.thumb_size))
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=85)
        data = buf.getvalue()
        with self._thumb_lock:
            self._thumbs[key] = data
            while len(self._thumbs) > self.limits.thumb_cache:
                self._thumbs.popitem(last=False)
        return data

    def explain(self, db_id: str, query_id: str | None = None, query_image: np.ndarray | None = None,
                box: tuple[float, float, float, float] | None = None) -> bytes:
        """PNG picturing why ``db_id`` matches the query (CVNet correspondences)."""
        if not self.reranker.available:
            raise Unavailable(f"match explanation is unavailable: {self.reranker.reason}")
        with self.lock.read():
            row = self.row_of(db_id)
            qrow = self.row_of(query_id) if query_id is not None else None
        if query_image is None:
            if qrow is None:
                raise BadRequest("give the query as ?query=<id> or upload a query image")
            query_image = self.image_of(qrow)
        if box is not None:
            query_image = crop_bbx(query_image, box)
        return self.reranker.explain(query_image, self.image_of(row))

    def stats(self) -> dict[str, Any]:
        meta = self.store.meta
        return {"images": len(self.ids), "dim": self.store.dim, "model": self.model.preset_name,
                "weights": getattr(self.model, "weights_id", "unknown"), "scales": list(self.scales),
                "store": {"uid": meta.get("uid"), "generation": meta.get("generation"),
                          "dtype": meta.get("dtype"), "has_maps": self.store.has_maps,
                          "chunks": self.store.num_chunks},
                "index": self.index_factory, "rerank_available": self.reranker.available,
                "rerank_reason": None if self.reranker.available else self.reranker.reason,
                "uptime_s": round(time.time() - self.started, 1), **self.counters}

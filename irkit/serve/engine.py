"""What the HTTP service adds around the one :class:`irkit.search.engine.SearchEngine`: limits,
locking, uploads, thumbnails, explanations and counters. Searching itself is the SearchEngine's.

Why this shape: the FeatureStore is the only thing on disk that must never be lost. Adds commit to
the store first (atomic), then go into the store's index by id (no rebuild, no retraining); the
index file is saved every ``Limits.index_save_every`` changes and at shutdown, and at start-up an
index that lags the store (a ``kill -9`` between the two) is brought up to date incrementally.
Searches take the read side of a readers-writer lock; adds embed their images *outside* the lock
and only hold the write side for the store commit and the index update, so searches keep flowing.
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

from irkit.errors import ConfigError, ImageError
from irkit.io.images import DEFAULT_MAX_PIXELS, crop_bbx, load_image
from irkit.models.base import GlobalModel
from irkit.search.engine import SearchEngine, SearchOptions
from irkit.search.explain import explain_png
from irkit.serve.concurrency import RWLock
from irkit.serve.errors import BadRequest, Conflict, NotFound, Unavailable
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
    thumb_size: int = 256
    thumb_cache: int = 512
    index_save_every: int = 100


#: what a boolean ``rerank``/``qe`` field of a request means (the page's toggles send booleans)
RERANK_TRUE, QE_TRUE = "cvnet", "alpha"


@dataclass
class Query:
    """One search: either an uploaded image (pixels) or an indexed id, optionally cropped to ``box``.

    ``rerank``: none | cvnet | spatial (True = cvnet); ``qe``: none | aqe | alpha (True = alpha)."""

    image: np.ndarray | None = None
    id: str | None = None
    box: tuple[float, float, float, float] | None = None
    k: int = 10
    rerank: str | bool = "none"
    qe: str | bool = "none"

    def __post_init__(self) -> None:
        if isinstance(self.rerank, bool):
            self.rerank = RERANK_TRUE if self.rerank else "none"
        if isinstance(self.qe, bool):
            self.qe = QE_TRUE if self.qe else "none"


@dataclass
class SearchResult:
    """The SearchEngine's hits plus what the page shows (thumbnail and explanation links, timings)."""

    hits: list[dict[str, Any]]
    rerank: str
    qe: str
    timings_ms: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        results = [{"rank": r, "id": h["id"], "score": h["score"], "global_score": h["global"], "stage": h["stage"],
                    "thumbnail": thumbnail_url(h["id"]), "explain": explain_url(h["id"])}
                   for r, h in enumerate(self.hits, 1)]
        return {"results": results, "reranked": self.rerank != "none", "rerank": self.rerank,
                "qe": self.qe != "none", "qe_method": self.qe,
                "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()}}


def thumbnail_url(image_id: str) -> str:
    return f"/images/{quote(image_id, safe='/')}/thumbnail"


def explain_url(image_id: str) -> str:
    return f"/images/{quote(image_id, safe='/')}/explain"


class Engine:
    """A SearchEngine with the locking, uploads and limits that make concurrent search + add safe."""

    def __init__(self, store_dir: str | Path, model: GlobalModel, limits: Limits | None = None,
                 index_factory: str | None = None, check_config: bool = True,
                 options: SearchOptions | None = None) -> None:
        self.limits = limits or Limits()
        self.options = options or SearchOptions()
        self.store_dir = Path(store_dir)
        self.search_engine = SearchEngine.open(self.store_dir, model=model, factory=index_factory,
                                               check_config=check_config)
        self.model = model
        self.store = self.search_engine.store
        self.lock = RWLock()
        self._write_mutex = threading.Lock()   # one add/remove at a time (embedding included)
        self._thumbs: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._thumb_lock = threading.Lock()
        self.started = time.time()
        self.counters = {"searches": 0, "adds": 0, "removes": 0}
        self._count_lock = threading.Lock()
        self._unsaved = 0
        self.uploads = self.store_dir / UPLOADS_DIR
        self._clean_orphan_uploads()

    @property
    def index(self):
        return self.search_engine.index

    def _clean_orphan_uploads(self) -> None:
        """Uploaded files whose add never committed (server killed mid-add) are deleted."""
        if not self.uploads.is_dir():
            return
        known = {Path(p).name for p in self.store.paths}
        for p in self.uploads.iterdir():
            if p.is_file() and p.name not in known:
                log.warning("removing orphan upload %s (its add did not complete)", p.name)
                try:
                    p.unlink(missing_ok=True)
                except OSError as exc:  # a read-only store: leave it
                    log.warning("cannot remove %s: %s", p, exc)

    def __len__(self) -> int:
        return len(self.store)

    def row_of(self, image_id: str) -> int:
        check_id(image_id)
        if image_id not in self.store:
            raise NotFound(f"no indexed image has id {image_id!r}")
        return self.store.index_of(image_id)

    def image_of(self, row: int) -> np.ndarray:
        path = self.store.paths[row]
        try:
            return load_image(path, max_pixels=DEFAULT_MAX_PIXELS)
        except ImageError as err:
            raise NotFound(f"the image file of id {self.store.ids[row]!r} is missing or unreadable on the server") \
                from err

    # ------------------------------------------------------------------ search
    def check_k(self, k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, int):
            raise BadRequest(f"k must be an integer, got {k!r}")
        if not 1 <= k <= self.limits.max_k:
            raise BadRequest(f"k must be between 1 and {self.limits.max_k}, got {k}")
        return k

    def search(self, q: Query) -> SearchResult:
        """Rank the store for one query through the SearchEngine; runs in the inference pool."""
        t0 = time.perf_counter()
        try:
            opts = SearchOptions(**{**vars(self.options), "k": self.check_k(q.k), "rerank": q.rerank, "qe": q.qe})
        except ConfigError as err:
            raise BadRequest(str(err)) from None
        if opts.rerank == "cvnet" and self.search_engine.cvnet_unavailable():
            raise Unavailable(f"re-ranking is unavailable: {self.search_engine.cvnet_unavailable()}")
        image = q.image
        if q.id is not None:
            with self.lock.read():
                row = self.row_of(q.id)
            if q.box is not None or opts.rerank == "spatial":
                image = self.image_of(row)
        with self.lock.read():
            if q.id is not None and image is None:
                self.row_of(q.id)  # still there under the lock
                hits = self.search_engine.search(id=q.id, options=opts)
            else:
                hits = self.search_engine.search(image, box=q.box, options=opts)
        self._count("searches")
        return SearchResult(hits, opts.rerank, opts.qe, {"total": (time.perf_counter() - t0) * 1000})

    # ------------------------------------------------------------------ writes
    def add(self, images: Sequence[tuple[str, bytes, np.ndarray, str]]) -> list[str]:
        """Add (id, original bytes, pixels, sniffed format) tuples; returns the ids added.

        The model runs before the write lock is taken; the original bytes are written (atomically)
        under ``uploads/``, then the descriptors go to the store (one atomic add) and the index."""
        with self._write_mutex:
            ids = [i for i, *_ in images]
            if len(set(ids)) != len(ids):
                raise BadRequest(f"the same id is given twice in one request: {sorted(set(i for i in ids if ids.count(i) > 1))[:5]}")
            taken = [i for i in ids if i in self.store]
            if taken:
                raise Conflict(f"id(s) already indexed: {taken[:5]}; delete them first or choose other ids")
            with_maps = self.search_engine.with_maps
            embedded = [self.search_engine.embed_with_map(img, with_map=with_maps) for _, _, img, _ in images]
            self.uploads.mkdir(parents=True, exist_ok=True)
            paths = []
            for image_id, data, _, fmt in images:
                name = hashlib.sha256(image_id.encode("utf-8")).hexdigest()[:32] + _EXT.get(fmt, ".img")
                path = self.uploads / name
                atomic_write_bytes(path, data)
                paths.append(str(path.resolve()))
            desc = np.stack([d for d, _ in embedded]).astype(np.float32)
            try:
                with self.lock.write():
                    self.search_engine.add(ids, paths, desc, maps=[m for _, m in embedded] if with_maps else None)
            except BaseException:
                for p in paths:  # the add did not commit: its upload files are orphans
                    Path(p).unlink(missing_ok=True)
                raise
            self._count("adds", len(ids))
            self._changed(len(ids))
            log.info("added %d image(s): %s", len(ids), ids[:5])
            return ids

    def remove(self, image_id: str) -> None:
        with self._write_mutex:
            self.row_of(image_id)
            with self.lock.write():
                path = Path(self.store.paths[self.store.index_of(image_id)])
                self.search_engine.remove([image_id])
            if path.parent.resolve() == self.uploads.resolve():
                path.unlink(missing_ok=True)   # only files this server wrote; never the user's own
            with self._thumb_lock:
                for key in [k for k in self._thumbs if k[0] == image_id]:
                    del self._thumbs[key]
            self._count("removes")
            self._changed(1)

    def _changed(self, n: int) -> None:
        """Save the index every ``limits.index_save_every`` changes (the store is already durable)."""
        self._unsaved += n
        if self._unsaved >= self.limits.index_save_every:
            self.save_index()

    def save_index(self) -> None:
        with self.lock.read():
            self.search_engine.save_index()
        self._unsaved = 0

    def close(self) -> None:
        """At shutdown: save the index if it changed since it was last saved."""
        if self._unsaved:
            self.save_index()

    def _count(self, name: str, n: int = 1) -> None:
        with self._count_lock:
            self.counters[name] += n

    # ------------------------------------------------------------------ pictures
    def thumbnail(self, image_id: str) -> bytes:
        """JPEG thumbnail (longest side ``limits.thumb_size``), cached in memory (LRU)."""
        with self.lock.read():
            row = self.row_of(image_id)
            path = self.store.paths[row]
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
        reason = self.search_engine.cvnet_unavailable()
        if reason:
            raise Unavailable(f"match explanation is unavailable: {reason}")
        with self.lock.read():
            row = self.row_of(db_id)
            qrow = self.row_of(query_id) if query_id is not None else None
        if query_image is None:
            if qrow is None:
                raise BadRequest("give the query as ?query=<id> or upload a query image")
            query_image = self.image_of(qrow)
        if box is not None:
            query_image = crop_bbx(query_image, box)
        return explain_png(self.model, query_image, self.image_of(row))

    def stats(self) -> dict[str, Any]:
        meta = self.store.meta
        reason = self.search_engine.cvnet_unavailable()
        return {"images": len(self.store), "dim": self.store.dim, "model": self.model.preset_name,
                "weights": getattr(self.model, "weights_id", "unknown"), "scales": list(self.search_engine.scales),
                "store": {"uid": meta.get("uid"), "generation": meta.get("generation"),
                          "dtype": meta.get("dtype"), "has_maps": self.store.has_maps,
                          "chunks": self.store.num_chunks},
                "index": self.search_engine.index.describe(), "search_defaults": vars(self.options),
                "rerank_available": not reason, "rerank_reason": reason or None,
                "uptime_s": round(time.time() - self.started, 1), **self.counters}

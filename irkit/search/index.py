"""Nearest-neighbour search over L2-normalised descriptors with faiss (inner product = cosine).

Why a wrapper: faiss factory strings give every index type (exact ``Flat`` by default, ``IVF..,PQ..``,
``HNSW..``, ``OPQ..``) behind one API, but training-set sampling, bounded-memory filling from a
store's memory map, -1 handling, exact re-scoring from the stored vectors, stable ids and detecting
that an index file no longer matches its store are left to us.

Keys. Every vector carries an int64 key inside faiss. An index built from a FeatureStore (or given
``ids``) is *id-mapped*: its keys are stable hashes of the image ids (:func:`id_keys`), so images can
be added and removed one by one without rebuilding or retraining, and the index survives the store's
row renumbering (removals, compaction). Searches still answer in row numbers of the attached store.
An index built from a bare array uses the row numbers themselves as keys.

An index saved at ``PATH`` has a JSON sidecar ``PATH.json`` (factory, dim, ntotal, key mode,
search parameters, the store's uid/generation/config hash) written after the index file. A missing
or disagreeing sidecar makes ``Index.load`` refuse; ``Index.load(store=...)`` refuses a stale index
(StoreError), while :func:`open_index` brings an id-mapped one up to date incrementally.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import faiss
import numpy as np
from tqdm import tqdm

from irkit.errors import ConfigError, StoreError
from irkit.utils import atomic_path, atomic_write_json

if TYPE_CHECKING:  # pragma: no cover
    from irkit.store import FeatureStore

log = logging.getLogger(__name__)

DEFAULT_INDEX_NAME = "index.faiss"
ADD_BATCH = 65536
ADD_TEMP_BYTES = 256 * 2**20  # bound on faiss's per-add temporaries (see Index.add_batch_rows)
KEY_MODES = ("row", "id")


def _faiss_msg(exc: Exception) -> str:
    """The useful tail of a faiss C++ exception message."""
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    for marker in ("Error: ", "): "):
        if marker in text:
            return text.rsplit(marker, 1)[-1].strip()
    return text


def id_keys(ids: Sequence[str]) -> np.ndarray:
    """Stable int64 keys of image ids: the first 8 bytes of blake2b, sign bit cleared (faiss uses -1)."""
    out = np.fromiter((int.from_bytes(hashlib.blake2b(str(i).encode("utf-8"), digest_size=8).digest(), "little")
                       & 0x7FFF_FFFF_FFFF_FFFF for i in ids), dtype=np.uint64, count=len(ids))
    return out.astype(np.int64)


class KeyRows:
    """Maps keys back to rows of an id list (a store's), kept up to date cheaply when ids are appended."""

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._keys = np.empty(0, np.int64)
        self._sorted = np.empty(0, np.int64)
        self._order = np.empty(0, np.int64)
        self._version: Any = None

    def update(self, ids: Sequence[str], version: Any = None) -> None:
        """Follow ``ids`` (``version`` e.g. the store's (uid, generation): equal means unchanged)."""
        if version is not None and version == self._version:
            return
        ids = list(ids)
        n_old = len(self._ids)
        if len(ids) >= n_old and ids[:n_old] == self._ids:
            keys = np.concatenate([self._keys, id_keys(ids[n_old:])])
        else:
            keys = id_keys(ids)
        order = np.argsort(keys, kind="stable")
        srt = keys[order]
        dup = np.flatnonzero(srt[1:] == srt[:-1])
        if len(dup):
            a, b = order[dup[0]], order[dup[0] + 1]
            raise StoreError(f"ids {ids[a]!r} and {ids[b]!r} hash to the same 64-bit index key; rename one")
        self._ids, self._keys, self._sorted, self._order, self._version = ids, keys, srt, order, version

    @property
    def keys(self) -> np.ndarray:
        return self._keys

    def rows(self, keys: np.ndarray) -> np.ndarray:
        """Row of each key (-1 for keys not in the list, and for -1)."""
        keys = np.asarray(keys, dtype=np.int64)
        if len(self._sorted) == 0:
            return np.full(keys.shape, -1, np.int64)
        pos = np.clip(np.searchsorted(self._sorted, keys), 0, len(self._sorted) - 1)
        found = (self._sorted[pos] == keys) & (keys >= 0)
        return np.where(found, self._order[pos], -1)


def as_queries(q: np.ndarray, dim: int, what: str = "queries") -> np.ndarray:
    q = np.asarray(q)
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != dim:
        raise ConfigError(f"{what} must have shape [n, {dim}] to match the index, got {tuple(q.shape)}")
    return np.ascontiguousarray(q, dtype=np.float32)


def _is_store(vectors: Any) -> bool:
    return hasattr(vectors, "iter_descriptors") and hasattr(vectors, "take")


def rows_source(vectors: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A function rows -> float32 vectors, from a FeatureStore (``take``) or any array-like."""
    if _is_store(vectors):
        return vectors.take

    def take(rows: np.ndarray) -> np.ndarray:
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), vectors.shape[1]), dtype=np.float32)
        out[order] = vectors[rows[order]]
        return out
    return take


def num_rows(vectors: Any) -> int:
    return len(vectors) if _is_store(vectors) else int(vectors.shape[0])


def iter_blocks(vectors: Any, batch_size: int):
    if _is_store(vectors):
        yield from vectors.iter_descriptors(batch_size)
        return
    for s in range(0, vectors.shape[0], batch_size):
        yield s, np.ascontiguousarray(vectors[s:s + batch_size], dtype=np.float32)


def dim_of(vectors: Any) -> int:
    return int(vectors.dim) if _is_store(vectors) else int(vectors.shape[1])


def _rescore_in_place(q: np.ndarray, vecs: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss ``knn_inner_products_by_idx`` over [nq, c] candidate rows of ``vecs`` (-1 rows trail, as
    faiss pads them). The leading dimension is passed explicitly: faiss 1.15's default (-1)
    mis-strides every query after the first."""
    nq, c = cand.shape
    kk = min(k, c)
    cand = np.ascontiguousarray(cand, dtype=np.int64)
    scores = np.empty((nq, kk), dtype=np.float32)
    rows = np.empty((nq, kk), dtype=np.int64)
    faiss.knn_inner_products_by_idx(faiss.swig_ptr(q), faiss.swig_ptr(vecs), faiss.swig_ptr(cand), q.shape[1],
                                    nq, vecs.shape[0], c, kk, faiss.swig_ptr(scores), faiss.swig_ptr(rows), c)
    missing = rows < 0
    scores[missing] = -np.inf
    if kk < k:
        scores = np.pad(scores, ((0, 0), (0, k - kk)), constant_values=-np.inf)
        rows = np.pad(rows, ((0, 0), (0, k - kk)), constant_values=-1)
    return scores, rows


def best_first(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Invalid entries (row -1) moved to the end with score -inf; the first k columns, padded."""
    scores = np.where(rows < 0, -np.inf, scores).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
    rows = np.where(np.isfinite(scores), rows, -1)
    if scores.shape[1] < k:
        pad = k - scores.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
    return scores, rows


def exact_knn(q: np.ndarray, vectors: Any, k: int, batch_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product of ``q`` over ``vectors`` (array, memmap or FeatureStore), streamed
    in blocks through faiss with bounded memory and no copy of the database: ground truth and
    neighbour lists where no index exists. (scores [nq, k] float32, rows [nq, k] int64), best first."""
    q = as_queries(q, dim_of(vectors))
    k = min(int(k), num_rows(vectors))
    heap = faiss.ResultHeap(q.shape[0], k, keep_max=True)
    for start, block in iter_blocks(vectors, batch_size):
        d, i = faiss.knn(q, np.ascontiguousarray(block, dtype=np.float32), min(k, len(block)),
                         metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(d, np.where(i >= 0, i + start, -1))
    heap.finalize()
    return heap.D.astype(np.float32), heap.I.astype(np.int64)


def default_train_size(index: faiss.Index, n: int) -> int:
    """Enough points for k-means (about 64 per IVF list, faiss warns under 39) and PQ (>= 256·64)."""
    want = 65536
    try:
        ivf = faiss.extract_index_ivf(index)
        want = max(want, 64 * ivf.nlist)
    except RuntimeError:
        pass
    return min(n, want)


def _with_ids(index: faiss.Index) -> faiss.Index:
    """``index`` able to hold int64 keys: IVF indexes carry them natively (and remove by key without
    renumbering); every other type is wrapped in ``IndexIDMap2``."""
    top = faiss.downcast_index(index)
    try:
        faiss.extract_index_ivf(index)
        native = not isinstance(top, faiss.IndexRefine)
    except RuntimeError:
        native = False
    return index if native else faiss.IndexIDMap2(index)


class Index:
    """A faiss inner-product index plus what is needed to use, update, re-score and persist it safely."""

    def __init__(self, index: faiss.Index, factory: str, *, meta: dict | None = None,
                 key_mode: str = "row", tombstones: Sequence[int] = ()) -> None:
        if key_mode not in KEY_MODES:
            raise ConfigError(f"key_mode must be one of {KEY_MODES}, got {key_mode!r}")
        self.faiss_index = index
        self.factory = factory
        self.meta: dict = dict(meta or {})
        self.key_mode = key_mode
        #: keys removed from an index type that cannot delete (HNSW, refine): filtered at search time
        self.tombstones: set[int] = {int(t) for t in tombstones}
        #: how often this object trained, added and removed (the service shows them; tests count them)
        self.counters = {"trains": 0, "adds": 0, "removes": 0}
        self._vectors: Any = None
        self._key_rows = KeyRows()
        self._static_ids: list[str] | None = None

    # ------------------------------------------------------------------ construction
    @staticmethod
    def create(dim: int, factory: str = "Flat") -> faiss.Index:
        """An empty faiss index for ``factory`` (inner product) that holds int64 keys; ConfigError if invalid."""
        if int(dim) <= 0:
            raise ConfigError(f"index dim must be positive, got {dim}")
        try:
            inner = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(
                f"invalid faiss factory string {factory!r} for dim {dim} ({_faiss_msg(exc)}); examples: 'Flat', "
                "'HNSW32', 'IVF1024,Flat', 'IVF4096,PQ64', 'OPQ16,IVF1024,PQ16' (PQ m must divide dim)"
            ) from None
        return _with_ids(inner)

    @classmethod
    def build(cls, descriptors: Any, factory: str = "Flat", *, ids: Sequence[str] | None = None,
              train_size: int | None = None, seed: int = 0, batch_size: int = ADD_BATCH,
              nprobe: int | None = None, ef_search: int | None = None, progress: bool = True) -> "Index":
        """Build from [N, D] descriptors (array, memmap or FeatureStore), filling in bounded batches.

        A FeatureStore (or explicit ``ids``) gives an id-mapped index (add/remove by id later); a bare
        array keys vectors by row. Trainable indexes are trained on ``train_size`` rows sampled at
        random (default: see ``default_train_size``). The descriptors are kept for ``search(rescore=True)``.
        """
        n, dim = num_rows(descriptors), dim_of(descriptors)
        if n == 0:
            raise StoreError("cannot build an index from an empty set of descriptors; extract features first")
        if ids is None and _is_store(descriptors):
            ids = descriptors.ids
        if ids is not None and len(ids) != n:
            raise ConfigError(f"{len(ids)} ids for {n} descriptors; give one id per row")
        self = cls(cls.create(dim, factory), factory, key_mode="id" if ids is not None else "row")
        self._attach_rows(descriptors, ids)
        keys = self._key_rows.keys if ids is not None else np.arange(n, dtype=np.int64)
        t0 = time.perf_counter()
        if not self.faiss_index.is_trained:
            self.train(descriptors, train_size=train_size, seed=seed)
        for start, block in tqdm(iter_blocks(descriptors, batch_size), total=-(-n // batch_size),
                                 desc=f"index {factory}", unit="batch", disable=not progress or n <= batch_size):
            self._add_keyed(block, keys[start:start + len(block)])
        self.set_params(nprobe=nprobe, ef_search=ef_search)
        self._vectors = descriptors
        log.info("built %s index of %d vectors (dim %d) in %.1fs", factory, n, dim, time.perf_counter() - t0)
        return self

    def train(self, descriptors: Any, *, train_size: int | None = None, seed: int = 0) -> None:
        """Train on a random sample of rows (sorted, so memory-mapped reads stay sequential)."""
        n = num_rows(descriptors)
        size = default_train_size(self.faiss_index, n) if train_size is None else min(int(train_size), n)
        try:
            nlist = faiss.extract_index_ivf(self.faiss_index).nlist
        except RuntimeError:
            nlist = 0
        if size < nlist:
            raise ConfigError(f"factory {self.factory!r} has {nlist} IVF lists but only {size} training "
                              f"vectors are available; use fewer lists (e.g. IVF{max(1, int(np.sqrt(n)))})")
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, size=size, replace=False)) if size < n else np.arange(n)
        sample = np.ascontiguousarray(rows_source(descriptors)(rows), dtype=np.float32)
        t0 = time.perf_counter()
        try:
            self.faiss_index.train(sample)
        except RuntimeError as exc:
            raise ConfigError(f"training faiss index {self.factory!r} on {size} vectors failed: "
                              f"{_faiss_msg(exc)}; give more training data "
                              "(--train-size) or a smaller index") from None
        self.counters["trains"] += 1
        log.info("trained %s on %d vectors in %.1fs", self.factory, size, time.perf_counter() - t0)

    def add(self, descriptors: np.ndarray, ids: Sequence[str] | None = None, batch_size: int = ADD_BATCH) -> None:
        """Add vectors without retraining: by ``ids`` (id-mapped index), else as the next rows."""
        x = np.asarray(descriptors)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ConfigError(f"vectors must have shape [n, {self.dim}], got {tuple(x.shape)}")
        if not self.faiss_index.is_trained:
            raise StoreError(f"index {self.factory!r} is not trained; build it with Index.build")
        if self.key_mode == "id":
            if ids is None or len(ids) != len(x):
                raise ConfigError("this index is keyed by image id: give one id per vector to add")
            keys = id_keys(ids)
            self.tombstones.difference_update(int(k) for k in keys)
        else:
            if ids is not None:
                raise ConfigError("this index is keyed by row (built from an array): it takes no ids")
            keys = np.arange(self.ntotal, self.ntotal + len(x), dtype=np.int64)
        for s in range(0, x.shape[0], batch_size):
            self._add_keyed(x[s:s + batch_size], keys[s:s + batch_size])

    def remove(self, ids: Sequence[str]) -> int:
        """Remove vectors by image id without rebuilding; returns how many were in the index.

        Index types that cannot delete in faiss (HNSW, ``,RFlat`` refinement) keep the keys as
        tombstones, filtered from every search and saved with the index."""
        if self.key_mode != "id":
            raise ConfigError("removing by id needs an id-mapped index (built from a store or with ids)")
        keys = np.unique(id_keys(ids))
        if not len(keys):
            return 0
        try:  # faiss deletes and counts in one pass (no copy of every stored key per delete)
            removed = int(self.faiss_index.remove_ids(faiss.IDSelectorBatch(keys)))
        except RuntimeError:  # this type cannot delete: tombstone the keys it holds
            present = keys[np.isin(keys, self.stored_keys())]
            present = [int(k) for k in present if int(k) not in self.tombstones]
            self.tombstones.update(present)
            removed = len(present)
        if removed:
            self.counters["removes"] += 1
        return removed

    def add_batch_rows(self) -> int:
        """Rows per faiss ``add`` call that keep faiss's temporaries under ``ADD_TEMP_BYTES``.

        Why: faiss PQ-encodes a batch through an [n, M, ksub] float distance table when the
        sub-vectors have >= 16 dims (2048-D with PQ128: 128 KiB per row, 8 GiB for 65,536 rows),
        which alone exhausted this machine's memory when indexing 1M x 2048-D."""
        per_row = 4 * self.dim
        subs = self._sub_indexes()
        subs += [faiss.downcast_index(s.refine_index) for s in subs if isinstance(s, faiss.IndexRefine)]
        for sub in subs:
            pq = getattr(sub, "pq", None)
            if isinstance(pq, faiss.ProductQuantizer):
                per_row += 4 * int(pq.M) * int(pq.ksub)
        return max(1, ADD_TEMP_BYTES // per_row)

    def _add_keyed(self, x: np.ndarray, keys: np.ndarray) -> None:
        step = self.add_batch_rows()
        for s in range(0, x.shape[0], step):
            self.faiss_index.add_with_ids(np.ascontiguousarray(x[s:s + step], dtype=np.float32),
                                          np.ascontiguousarray(keys[s:s + step], dtype=np.int64))
        self.counters["adds"] += 1

    # ------------------------------------------------------------------ properties / parameters
    @property
    def dim(self) -> int:
        return int(self.faiss_index.d)

    @property
    def ntotal(self) -> int:
        """Vectors searchable (tombstoned ones excluded)."""
        return int(self.faiss_index.ntotal) - len(self.tombstones)

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        return f"Index({self.factory!r}, dim={self.dim}, ntotal={self.ntotal}, keys={self.key_mode})"

    def describe(self) -> dict[str, Any]:
        """What a user (or ``/stats``) wants to know about this index."""
        return {"factory": self.factory, "dim": self.dim, "ntotal": self.ntotal, "keys": self.key_mode,
                "nprobe": self.nprobe, "ef_search": self.ef_search, "tombstones": len(self.tombstones),
                "counters": dict(self.counters),
                **{k: self.meta[k] for k in ("path", "auto", "train_size", "dba") if self.meta.get(k) is not None}}

    def stored_keys(self) -> np.ndarray:
        """Keys of the vectors in faiss (tombstones included), read from the index itself."""
        top = faiss.downcast_index(self.faiss_index)
        if isinstance(top, (faiss.IndexIDMap2, faiss.IndexIDMap)):
            return faiss.vector_to_array(top.id_map).astype(np.int64)
        ivf = faiss.extract_index_ivf(self.faiss_index)
        lists = ivf.invlists
        out = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
               for i in range(ivf.nlist) if lists.list_size(i)]
        return np.concatenate(out).astype(np.int64) if out else np.empty(0, np.int64)

    def live_keys(self) -> np.ndarray:
        keys = self.stored_keys()
        if self.tombstones:
            keys = keys[~np.isin(keys, np.fromiter(self.tombstones, np.int64))]
        return keys

    def _param(self, name: str) -> int | None:
        for sub in self._sub_indexes():
            if name == "nprobe" and hasattr(sub, "nprobe") and isinstance(sub, faiss.IndexIVF):
                return int(sub.nprobe)
            if name == "efSearch" and isinstance(sub, faiss.IndexHNSW):
                return int(sub.hnsw.efSearch)
            if name == "k_factor" and isinstance(sub, faiss.IndexRefine):
                return int(sub.k_factor)
        return None

    def _sub_indexes(self) -> list[faiss.Index]:
        out = [faiss.downcast_index(self.faiss_index)]
        while True:  # unwrap id maps, pre-transforms (OPQ) and exact refinement (",RFlat")
            top = out[-1]
            if isinstance(top, (faiss.IndexIDMap2, faiss.IndexIDMap, faiss.IndexPreTransform)):
                inner = top.index
            elif isinstance(top, faiss.IndexRefine):
                inner = top.base_index
            else:
                return out
            out.append(faiss.downcast_index(inner))

    @property
    def nprobe(self) -> int | None:
        """IVF lists visited per query (None for non-IVF indexes)."""
        return self._param("nprobe")

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self.set_params(nprobe=value)

    @property
    def ef_search(self) -> int | None:
        """HNSW candidate-list size at search time (None for non-HNSW indexes)."""
        return self._param("efSearch")

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        self.set_params(ef_search=value)

    def set_params(self, *, nprobe: int | None = None, ef_search: int | None = None,
                   k_factor: int | None = None) -> None:
        """Set search-time parameters; ConfigError when the index type has no such parameter.

        ``k_factor`` applies to indexes with faiss's exact refinement (factory suffix ``,RFlat``):
        ``k * k_factor`` candidates are re-scored exactly inside faiss."""
        for name, value in (("nprobe", nprobe), ("efSearch", ef_search), ("k_factor", k_factor)):
            if value is None:
                continue
            if int(value) <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
            if self._param(name) is None:
                raise ConfigError(f"{name} does not apply to a {self.factory!r} index")
            for sub in self._sub_indexes():
                if name == "nprobe" and isinstance(sub, faiss.IndexIVF):
                    sub.nprobe = int(value)
                elif name == "efSearch" and isinstance(sub, faiss.IndexHNSW):
                    sub.hnsw.efSearch = int(value)
                elif name == "k_factor" and isinstance(sub, faiss.IndexRefine):
                    sub.k_factor = float(value)

    # ------------------------------------------------------------------ rows of the attached vectors
    def _attach_rows(self, vectors: Any, ids: Sequence[str] | None) -> None:
        if self.key_mode != "id":
            return
        if ids is not None and not _is_store(vectors):
            self._static_ids = list(ids)
        self._refresh_rows(vectors)

    def _refresh_rows(self, vectors: Any) -> None:
        if _is_store(vectors):
            self._key_rows.update(vectors.ids, (vectors.uid, vectors.generation, len(vectors)))
        elif self._static_ids is not None:
            self._key_rows.update(self._static_ids, ("static", len(self._static_ids)))

    def attach(self, vectors: Any, ids: Sequence[str] | None = None) -> None:
        """Give the stored vectors (FeatureStore or [N, D] array; with ``ids`` for an id-mapped index)
        whose row numbers searches answer in, and which ``search(rescore=True)`` re-scores with."""
        if self.key_mode == "id":
            if ids is None and not _is_store(vectors):
                raise ConfigError("an id-mapped index needs a FeatureStore or the ids of the array rows")
            self._vectors = vectors
            self._attach_rows(vectors, ids)
            return
        if num_rows(vectors) != self.ntotal or dim_of(vectors) != self.dim:
            raise StoreError(f"vectors of shape [{num_rows(vectors)}, {dim_of(vectors)}] do not match "
                             f"the index ({self.ntotal} x {self.dim}); rebuild the index")
        self._vectors = vectors

    # ------------------------------------------------------------------ search
    def search(self, q: np.ndarray, k: int, *, rescore: bool = False, rescore_k: int = 1000,
               batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: (scores [nq, k] float32, rows [nq, k] int64), best first.

        Rows are row numbers of the attached store/array. Missing results (k > ntotal, an IVF probe
        finding too few, vectors whose image left the store) have row -1 and score -inf.
        ``rescore``: fetch ``max(k, rescore_k)`` candidates, re-score them exactly with the stored
        vectors and keep the best k (recovers PQ's quantisation loss).
        """
        q = as_queries(q, self.dim)
        k = int(k)
        if k <= 0:
            raise ConfigError(f"k must be positive, got {k}")
        if self.ntotal == 0:
            raise StoreError("the index is empty; add descriptors before searching")
        if rescore and self._vectors is None:
            raise ConfigError("rescore=True needs the stored vectors: build from a store/array or "
                              "Index.load(path, store=store)")
        if rescore and self.meta.get("dba"):
            raise ConfigError("this index holds DBA-augmented vectors; rescoring with the stored "
                              "(original) descriptors would undo DBA: search without rescore")
        if self.key_mode == "id":
            if self._vectors is None and self._static_ids is None:
                raise ConfigError("an id-mapped index answers in store rows: attach its store first "
                                  "(Index.load(path, store=store) or index.attach(store))")
            self._refresh_rows(self._vectors)
        kk = min(max(k, int(rescore_k)), self.ntotal) if rescore else k
        fetch = kk + len(self.tombstones)
        scores = np.empty((q.shape[0], k), dtype=np.float32)
        rows = np.empty((q.shape[0], k), dtype=np.int64)
        tomb = np.fromiter(self.tombstones, np.int64) if self.tombstones else None
        for s in range(0, q.shape[0], batch_size):
            d, keys = self.faiss_index.search(q[s:s + batch_size], fetch)
            keys = keys.astype(np.int64, copy=False)
            if tomb is not None:
                keys = np.where(np.isin(keys, tomb), -1, keys)
            r = self._key_rows.rows(keys) if self.key_mode == "id" else keys
            d, r = best_first(d, r, kk)
            if rescore:
                d, r = self._rescore(q[s:s + batch_size], r, k)
            scores[s:s + batch_size], rows[s:s + batch_size] = d[:, :k], r[:, :k]
        return scores, rows

    def _rescore(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of each query's candidates, best k first.

        A float32 C-contiguous array or memmap is scored in place by faiss (C++, all threads, no
        gather); anything else (a FeatureStore) one query at a time (a few MB in cache)."""
        vecs = self._vectors
        if (isinstance(vecs, np.ndarray) and vecs.dtype == np.float32 and vecs.flags.c_contiguous
                and vecs.ndim == 2):
            return _rescore_in_place(q, vecs, cand, k)
        take = rows_source(vecs)
        exact = np.full(cand.shape, -np.inf, dtype=np.float32)
        for i in range(cand.shape[0]):
            valid = np.flatnonzero(cand[i] >= 0)
            if len(valid):
                exact[i, valid] = take(cand[i, valid]) @ q[i]
        return best_first(exact, cand, k)

    # ------------------------------------------------------------------ keeping up with a store
    def sync(self, store: "FeatureStore", batch_size: int = ADD_BATCH) -> tuple[int, int]:
        """Bring an id-mapped index up to date with ``store`` incrementally (no rebuild, no retraining):
        adds the store's rows it lacks, removes what left the store. Returns (added, removed)."""
        if self.key_mode != "id":
            raise ConfigError("only an id-mapped index can follow its store; rebuild this one")
        self._vectors = store
        self._refresh_rows(store)
        have = self.live_keys()
        store_keys = self._key_rows.keys
        extra = have[~np.isin(have, store_keys)]
        removed = 0
        if len(extra):
            try:
                self.faiss_index.remove_ids(faiss.IDSelectorBatch(extra))
            except RuntimeError:
                self.tombstones.update(int(k) for k in extra)
            self.counters["removes"] += 1
            removed = len(extra)
        missing = np.flatnonzero(~np.isin(store_keys, have))
        for s in range(0, len(missing), batch_size):
            rows = missing[s:s + batch_size]
            keys = store_keys[rows]
            self.tombstones.difference_update(int(k) for k in keys)
            self._add_keyed(store.take(rows), keys)
        if len(missing) or removed:
            log.info("index synced with store %s: %d added, %d removed", store.root, len(missing), removed)
        self.meta["store"] = store_fingerprint(store)
        return int(len(missing)), int(removed)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, *, store: "FeatureStore | None" = None) -> Path:
        """Write the index and then its sidecar ``PATH.json`` atomically; returns the index path."""
        path = Path(path)
        with atomic_path(path, suffix=".tmp") as tmp:
            faiss.write_index(self.faiss_index, str(tmp))
        sidecar = dict(self.meta)
        sidecar.update({"format": "irkit-index", "version": 2, "factory": self.factory, "dim": self.dim,
                        "ntotal": self.ntotal, "index_bytes": path.stat().st_size, "keys": self.key_mode,
                        "tombstones": sorted(self.tombstones), "nprobe": self.nprobe,
                        "ef_search": self.ef_search, "saved": time.time()})
        if store is not None:
            sidecar["store"] = store_fingerprint(store)
        atomic_write_json(sidecar_path(path), sidecar)
        self.meta = sidecar
        log.info("saved %s index (%d vectors) to %s", self.factory, self.ntotal, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, store: "FeatureStore | None" = None, mmap: bool = False,
             check_store: bool = True) -> "Index":
        """Load an index saved by ``save``; with ``store``, refuse (StoreError) if it is stale
        (``check_store=False`` only refuses an index of another store: :func:`open_index` then syncs it).

        ``mmap``: memory-map the index file instead of reading it (large IVF indexes; read-only).
        """
        path = Path(path)
        side_path = sidecar_path(path)
        if not path.exists():
            raise StoreError(f"no index at {path}; build it with `irkit index STORE_DIR`")
        if not side_path.exists():
            raise StoreError(f"index {path} has no sidecar {side_path.name} (interrupted save?); rebuild it")
        try:
            meta = json.loads(side_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise StoreError(f"cannot read {side_path}: {exc}; rebuild the index") from exc
        if meta.get("index_bytes") != path.stat().st_size:
            raise StoreError(f"index {path} and its sidecar disagree (interrupted save?); rebuild the index")
        if store is not None:
            check_same_store(meta, store, path)
            if check_store:
                check_fresh(meta, store, path)
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError as exc:
            raise StoreError(f"cannot read faiss index {path}: {_faiss_msg(exc)}") from None
        tombstones = meta.get("tombstones", [])
        if index.ntotal - len(tombstones) != meta["ntotal"] or index.d != meta["dim"]:
            raise StoreError(f"index {path} holds {index.ntotal}x{index.d} but its sidecar says "
                             f"{meta['ntotal']}x{meta['dim']}; rebuild the index")
        self = cls(index, meta["factory"], meta=meta, key_mode=meta.get("keys", "row"), tombstones=tombstones)
        if meta.get("nprobe") is not None:
            self.set_params(nprobe=meta["nprobe"])
        if meta.get("ef_search") is not None:
            self.set_params(ef_search=meta["ef_search"])
        self.meta["path"] = str(path)
        if store is not None:
            self._vectors = store
            self._refresh_rows(store)
        return self


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def store_fingerprint(store: "FeatureStore") -> dict:
    return {"uid": store.uid, "generation": store.generation, "config_hash": store.meta["config_hash"],
            "model": store.meta["model"], "n": len(store), "root": str(store.root)}


def check_same_store(meta: dict, store: "FeatureStore", path: Path | str = "index") -> None:
    """StoreError unless the index described by ``meta`` was built from ``store`` (same uid and config)."""
    fp = meta.get("store")
    if fp is None:
        raise StoreError(f"index {path} records no store; it cannot be checked against {store.root}: rebuild it")
    now = store_fingerprint(store)
    if fp["config_hash"] != now["config_hash"] or fp["uid"] != now["uid"]:
        raise StoreError(f"index {path} was built from another store (model {fp['model']!r}, config "
                         f"{fp['config_hash'][:12]}) than {store.root} (model {now['model']!r}, config "
                         f"{now['config_hash'][:12]}); rebuild it with `irkit index {store.root}`")


def check_fresh(meta: dict, store: "FeatureStore", path: Path | str = "index") -> None:
    """StoreError unless the index described by ``meta`` was built from ``store`` as it is now."""
    check_same_store(meta, store, path)
    fp, now = meta["store"], store_fingerprint(store)
    if fp["generation"] != now["generation"] or fp["n"] != now["n"] or meta.get("ntotal") != now["n"]:
        raise StoreError(f"index {path} is stale: built from {fp['n']} rows (store generation "
                         f"{fp['generation']}), the store now has {now['n']} rows (generation "
                         f"{now['generation']}); rebuild it with `irkit index {store.root}`")


def default_index_path(store: "FeatureStore") -> Path:
    return Path(store.root) / DEFAULT_INDEX_NAME


__all__: Sequence[str] = ["Index", "check_fresh", "check_same_store", "default_index_path",
                          "default_train_size", "exact_knn", "id_keys"]

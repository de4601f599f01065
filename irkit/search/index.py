"""Nearest-neighbour search over L2-normalised descriptors with faiss (inner product = cosine).

Why a wrapper: faiss factory strings give every index type (exact ``Flat`` by default, ``IVF..,PQ..``,
``HNSW..``, ``OPQ..``) behind one API, but training-set sampling, bounded-memory filling from a
store's memory map, -1 handling, exact re-scoring from the stored vectors and detecting that an
index file no longer matches its store are left to us.

An index saved at ``PATH`` has a JSON sidecar ``PATH.json`` (factory, dim, ntotal, search
parameters, and the store's uid/generation/config hash) written after the index file; a missing or
disagreeing sidecar, or a store that changed since, makes ``Index.load`` refuse with StoreError.
"""
from __future__ import annotations

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


def _faiss_msg(exc: Exception) -> str:
    """The useful tail of a faiss C++ exception message."""
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    for marker in ("Error: ", "): "):
        if marker in text:
            return text.rsplit(marker, 1)[-1].strip()
    return text


def _as_queries(q: np.ndarray, dim: int, what: str = "queries") -> np.ndarray:
    q = np.asarray(q)
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != dim:
        raise ConfigError(f"{what} must have shape [n, {dim}] to match the index, got {tuple(q.shape)}")
    return np.ascontiguousarray(q, dtype=np.float32)


def _rows_source(vectors: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A function rows -> float32 vectors, from a FeatureStore (``take``) or any array-like."""
    if hasattr(vectors, "take") and hasattr(vectors, "iter_descriptors"):
        return vectors.take

    def take(rows: np.ndarray) -> np.ndarray:
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), vectors.shape[1]), dtype=np.float32)
        out[order] = vectors[rows[order]]
        return out
    return take


def _num_rows(vectors: Any) -> int:
    return len(vectors) if hasattr(vectors, "iter_descriptors") else int(vectors.shape[0])


def _iter_blocks(vectors: Any, batch_size: int):
    if hasattr(vectors, "iter_descriptors"):
        yield from vectors.iter_descriptors(batch_size)
        return
    for s in range(0, vectors.shape[0], batch_size):
        yield s, np.ascontiguousarray(vectors[s:s + batch_size], dtype=np.float32)


def _dim_of(vectors: Any) -> int:
    return int(vectors.dim) if hasattr(vectors, "iter_descriptors") else int(vectors.shape[1])


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


def default_train_size(index: faiss.Index, n: int) -> int:
    """Enough points for k-means (about 64 per IVF list, faiss warns under 39) and PQ (>= 256·64)."""
    want = 65536
    try:
        ivf = faiss.extract_index_ivf(index)
        want = max(want, 64 * ivf.nlist)
    except RuntimeError:
        pass
    return min(n, want)


class Index:
    """A faiss inner-product index plus what is needed to use, re-score and persist it safely."""

    def __init__(self, index: faiss.Index, factory: str, *, meta: dict | None = None):
        self.faiss_index = index
        self.factory = factory
        self.meta: dict = dict(meta or {})
        self._vectors: Any = None

    # ------------------------------------------------------------------ construction
    @staticmethod
    def create(dim: int, factory: str = "Flat") -> faiss.Index:
        """An empty faiss index for ``factory`` with the inner-product metric; ConfigError if invalid."""
        if int(dim) <= 0:
            raise ConfigError(f"index dim must be positive, got {dim}")
        try:
            return faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(
                f"invalid faiss factory string {factory!r} for dim {dim} ({_faiss_msg(exc)}); examples: 'Flat', "
                "'HNSW32', 'IVF1024,Flat', 'IVF4096,PQ64', 'OPQ16,IVF1024,PQ16' (PQ m must divide dim)"
            ) from None

    @classmethod
    def build(cls, descriptors: Any, factory: str = "Flat", *, train_size: int | None = None,
              seed: int = 0, batch_size: int = ADD_BATCH, nprobe: int | None = None,
              ef_search: int | None = None, progress: bool = True) -> "Index":
        """Build from [N, D] descriptors (array, memmap or FeatureStore), filling in bounded batches.

        Trainable indexes are trained on ``train_size`` rows sampled at random (default: see
        ``default_train_size``). The descriptors are kept for ``search(rescore=True)``.
        """
        n, dim = _num_rows(descriptors), _dim_of(descriptors)
        if n == 0:
            raise StoreError("cannot build an index from an empty set of descriptors; extract features first")
        index = cls.create(dim, factory)
        self = cls(index, factory)
        t0 = time.perf_counter()
        if not index.is_trained:
            self.train(descriptors, train_size=train_size, seed=seed)
        for _, block in tqdm(_iter_blocks(descriptors, batch_size), total=-(-n // batch_size),
                             desc=f"index {factory}", unit="batch", disable=not progress or n <= batch_size):
            self._add_rows(block)
        self.set_params(nprobe=nprobe, ef_search=ef_search)
        self._vectors = descriptors
        log.info("built %s index of %d vectors (dim %d) in %.1fs", factory, n, dim, time.perf_counter() - t0)
        return self

    def train(self, descriptors: Any, *, train_size: int | None = None, seed: int = 0) -> None:
        """Train on a random sample of rows (sorted, so memory-mapped reads stay sequential)."""
        n = _num_rows(descriptors)
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
        sample = np.ascontiguousarray(_rows_source(descriptors)(rows), dtype=np.float32)
        t0 = time.perf_counter()
        try:
            self.faiss_index.train(sample)
        except RuntimeError as exc:
            raise ConfigError(f"training faiss index {self.factory!r} on {size} vectors failed: "
                              f"{_faiss_msg(exc)}; give more training data "
                              "(--train-size) or a smaller index") from None
        log.info("trained %s on %d vectors in %.1fs", self.factory, size, time.perf_counter() - t0)

    def add(self, descriptors: np.ndarray, batch_size: int = ADD_BATCH) -> None:
        """Append vectors; their rows continue from ``ntotal``."""
        x = np.asarray(descriptors)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ConfigError(f"vectors must have shape [n, {self.dim}], got {tuple(x.shape)}")
        if not self.faiss_index.is_trained:
            raise StoreError(f"index {self.factory!r} is not trained; build it with Index.build")
        for s in range(0, x.shape[0], batch_size):
            self._add_rows(x[s:s + batch_size])

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

    def _add_rows(self, x: np.ndarray) -> None:
        step = self.add_batch_rows()
        for s in range(0, x.shape[0], step):
            self.faiss_index.add(np.ascontiguousarray(x[s:s + step], dtype=np.float32))

    # ------------------------------------------------------------------ properties / parameters
    @property
    def dim(self) -> int:
        return int(self.faiss_index.d)

    @property
    def ntotal(self) -> int:
        return int(self.faiss_index.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        return f"Index({self.factory!r}, dim={self.dim}, ntotal={self.ntotal})"

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
        while True:  # unwrap pre-transforms (OPQ) and exact refinement (",RFlat") to the inner index
            inner = out[-1].index if isinstance(out[-1], faiss.IndexPreTransform) else (
                out[-1].base_index if isinstance(out[-1], faiss.IndexRefine) else None)
            if inner is None:
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

    # ------------------------------------------------------------------ search
    def attach(self, vectors: Any) -> None:
        """Give the stored vectors (FeatureStore or [N, D] array) used by ``search(rescore=True)``."""
        if _num_rows(vectors) != self.ntotal or _dim_of(vectors) != self.dim:
            raise StoreError(f"vectors of shape [{_num_rows(vectors)}, {_dim_of(vectors)}] do not match "
                             f"the index ({self.ntotal} x {self.dim}); rebuild the index")
        self._vectors = vectors

    def search(self, q: np.ndarray, k: int, *, rescore: bool = False, rescore_k: int = 1000,
               batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: (scores [nq, k] float32, rows [nq, k] int64), best first.

        Missing results (k > ntotal, or an IVF probe finding too few) have row -1 and score -inf.
        ``rescore``: fetch ``max(k, rescore_k)`` candidates, re-score them exactly with the stored
        vectors and keep the best k (recovers PQ's quantisation loss).
        """
        q = _as_queries(q, self.dim)
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
        kk = max(k, int(rescore_k)) if rescore else k
        kk = min(kk, self.ntotal) if rescore else kk
        scores = np.empty((q.shape[0], k), dtype=np.float32)
        rows = np.empty((q.shape[0], k), dtype=np.int64)
        for s in range(0, q.shape[0], batch_size):
            d, i = self.faiss_index.search(q[s:s + batch_size], kk)
            i = i.astype(np.int64, copy=False)
            d = np.where(i < 0, -np.inf, d).astype(np.float32)
            if rescore:
                d, i = self._rescore(q[s:s + batch_size], i, k)
            scores[s:s + batch_size], rows[s:s + batch_size] = d[:, :k], i[:, :k]
        return scores, rows

    def _rescore(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of each query's candidates, best k first.

        A float32 C-contiguous array or memmap is scored in place by faiss (C++, all threads, no
        gather); anything else (a FeatureStore) one query at a time (a few MB in cache)."""
        vecs = self._vectors
        if (isinstance(vecs, np.ndarray) and vecs.dtype == np.float32 and vecs.flags.c_contiguous
                and vecs.ndim == 2):
            return _rescore_in_place(q, vecs, cand, k)
        take = _rows_source(vecs)
        exact = np.full(cand.shape, -np.inf, dtype=np.float32)
        for i in range(cand.shape[0]):
            valid = np.flatnonzero(cand[i] >= 0)
            if len(valid):
                exact[i, valid] = take(cand[i, valid]) @ q[i]
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        out_s = np.take_along_axis(exact, order, axis=1)
        out_r = np.take_along_axis(cand, order, axis=1)
        if out_s.shape[1] < k:
            pad = k - out_s.shape[1]
            out_s = np.pad(out_s, ((0, 0), (0, pad)), constant_values=-np.inf)
            out_r = np.pad(out_r, ((0, 0), (0, pad)), constant_values=-1)
        out_r[~np.isfinite(out_s)] = -1
        return out_s, out_r

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, *, store: "FeatureStore | None" = None) -> Path:
        """Write the index and then its sidecar ``PATH.json`` atomically; returns the index path."""
        path = Path(path)
        with atomic_path(path, suffix=".tmp") as tmp:
            faiss.write_index(self.faiss_index, str(tmp))
        sidecar = dict(self.meta)
        sidecar.update({"format": "irkit-index", "version": 1, "factory": self.factory, "dim": self.dim,
                        "ntotal": self.ntotal, "index_bytes": path.stat().st_size,
                        "nprobe": self.nprobe, "ef_search": self.ef_search, "saved": time.time()})
        if store is not None:
            sidecar["store"] = _store_fingerprint(store)
        atomic_write_json(_sidecar(path), sidecar)
        self.meta = sidecar
        log.info("saved %s index (%d vectors) to %s", self.factory, self.ntotal, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, store: "FeatureStore | None" = None, mmap: bool = False) -> "Index":
        """Load an index saved by ``save``; with ``store``, refuse (StoreError) if it is stale.

        ``mmap``: memory-map the index file instead of reading it (large IVF indexes).
        """
        path = Path(path)
        side_path = _sidecar(path)
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
            check_fresh(meta, store, path)
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError as exc:
            raise StoreError(f"cannot read faiss index {path}: {_faiss_msg(exc)}") from None
        if index.ntotal != meta["ntotal"] or index.d != meta["dim"]:
            raise StoreError(f"index {path} holds {index.ntotal}x{index.d} but its sidecar says "
                             f"{meta['ntotal']}x{meta['dim']}; rebuild the index")
        self = cls(index, meta["factory"], meta=meta)
        if meta.get("nprobe") is not None:
            self.set_params(nprobe=meta["nprobe"])
        if meta.get("ef_search") is not None:
            self.set_params(ef_search=meta["ef_search"])
        if store is not None:
            self._vectors = store
        return self


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _store_fingerprint(store: "FeatureStore") -> dict:
    return {"uid": store.uid, "generation": store.generation, "config_hash": store.meta["config_hash"],
            "model": store.meta["model"], "n": len(store), "root": str(store.root)}


def check_fresh(meta: dict, store: "FeatureStore", path: Path | str = "index") -> None:
    """StoreError unless the index described by ``meta`` was built from ``store`` as it is now."""
    fp = meta.get("store")
    if fp is None:
        raise StoreError(f"index {path} records no store; it cannot be checked against {store.root}: rebuild it")
    now = _store_fingerprint(store)
    if fp["config_hash"] != now["config_hash"] or fp["uid"] != now["uid"]:
        raise StoreError(f"index {path} was built from another store (model {fp['model']!r}, config "
                         f"{fp['config_hash'][:12]}) than {store.root} (model {now['model']!r}, config "
                         f"{now['config_hash'][:12]}); rebuild it with `irkit index {store.root}`")
    if fp["generation"] != now["generation"] or fp["n"] != now["n"] or meta.get("ntotal") != now["n"]:
        raise StoreError(f"index {path} is stale: built from {fp['n']} rows (store generation "
                         f"{fp['generation']}), the store now has {now['n']} rows (generation "
                         f"{now['generation']}); rebuild it with `irkit index {store.root}`")


def default_index_path(store: "FeatureStore") -> Path:
    return Path(store.root) / DEFAULT_INDEX_NAME


def build_index(store: "FeatureStore", factory: str = "Flat", path: str | os.PathLike | None = None, *,
                train_size: int | None = None, nprobe: int | None = None, ef_search: int | None = None,
                dba_k: int = 0, dba_alpha: float | None = None, seed: int = 0) -> Index:
    """Build the index of a store (optionally on DBA-augmented vectors) and save it beside the store.

    ``path`` defaults to ``STORE_DIR/index.faiss``; ``path=""`` skips saving.
    """
    if len(store) == 0:
        raise StoreError(f"store {store.root} is empty; extract features into it before indexing")
    index = Index.build(store, factory, train_size=train_size, seed=seed, nprobe=nprobe, ef_search=ef_search)
    if dba_k:
        from irkit.search.qe import dba

        db = store.descriptors()
        augmented = dba(db, int(dba_k), dba_alpha, neighbours=index.search(db, int(dba_k) + 1))
        index.faiss_index.reset()
        index.add(augmented)
        index.meta["dba"] = {"k": int(dba_k), "alpha": dba_alpha}
    index.meta["train_size"] = train_size
    if path is None:
        path = default_index_path(store)
    if path != "":
        index.save(path, store=store)
    return index


def load_or_build(store: "FeatureStore", factory: str = "Flat", path: str | os.PathLike | None = None,
                  **kwargs: Any) -> Index:
    """Load the saved index if it matches the store (and factory), else rebuild and save it (logged)."""
    path = Path(path) if path is not None else default_index_path(store)
    try:
        index = Index.load(path, store=store)
        if index.factory == factory:
            return index
        log.warning("index %s is %r, %r requested: rebuilding", path, index.factory, factory)
    except StoreError as exc:
        log.warning("%s -- rebuilding", exc)
    return build_index(store, factory, path, **kwargs)


def exact_search(q: np.ndarray, db: Any, k: int, batch_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k by inner product over a (memory-mapped) database, streaming it in blocks."""
    q = _as_queries(q, _dim_of(db))
    k = min(int(k), _num_rows(db))
    best_s = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
    best_r = np.full((q.shape[0], k), -1, dtype=np.int64)
    for start, block in _iter_blocks(db, batch_size):
        s = q @ block.T
        s_all = np.concatenate([best_s, s], axis=1)
        r_all = np.concatenate([best_r, np.arange(start, start + block.shape[0])[None].repeat(q.shape[0], 0)], 1)
        top = np.argpartition(-s_all, k - 1, axis=1)[:, :k] if s_all.shape[1] > k else \
            np.broadcast_to(np.arange(s_all.shape[1]), (q.shape[0], s_all.shape[1]))
        best_s = np.take_along_axis(s_all, top, 1)
        best_r = np.take_along_axis(r_all, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_r, order, 1)


__all__: Sequence[str] = ["Index", "build_index", "load_or_build", "check_fresh", "default_index_path",
                          "default_train_size", "exact_search"]

"""Query expansion (AQE, alpha-QE) and database-side augmentation (DBA); METHODS.md §4.

Why: re-querying with the average of a query and its confident top neighbours (or, offline,
replacing every database vector by such an average) adds the views of an object that the first
search found, a cheap and standard mAP gain for global descriptors.

Formulas (x_i = i-th nearest database vector by inner product, s_i its similarity, all L2-normalised):

* ``aqe``:      q' = L2(q + sum_{i=1..k} x_i)                                  (Chum et al. 2007)
* ``alpha_qe``: q' = L2(q + sum_{i=1..k} max(s_i, 0)^alpha x_i)                (Radenovic et al. 2018)
* ``dba``:      x' = L2(sum_{i=0..k} w_i x_i) where x_0 = x itself (w_0 = 1) and its k nearest
  other database vectors follow; ``alpha=None``: linear decay w_i = (k + 1 - i) / (k + 1)
  (Gordo et al. 2017); ``alpha`` given: w_i = max(s_i, 0)^alpha (and w_0 = 1).

Negative similarities are clipped to 0 before the power (a fractional power is undefined for them).
Every function accepts numpy arrays (memmaps included) or torch tensors and returns the same
kind, float32 and L2-normalised; ``k=0`` returns the (normalised) input. Neighbours are found by an
exact (Flat) index search unless ``neighbours=(scores, rows)`` from an index search is passed.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from irkit.errors import ConfigError
from irkit.search.index import exact_knn, rows_source

try:  # torch is a project dependency, but QE itself only needs numpy
    import torch
except ImportError:  # pragma: no cover
    torch = None


def _to_numpy(x: Any) -> tuple[np.ndarray, Any]:
    if hasattr(x, "iter_descriptors"):  # a FeatureStore
        return x.descriptors(), None
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float32).numpy(), x.device
    return x, None


def _back(x: np.ndarray, device: Any) -> Any:
    if device is None:
        return x
    return torch.from_numpy(x).to(device)


def l2n(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation to float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def _check_k(k: int) -> int:
    if int(k) < 0:
        raise ConfigError(f"query-expansion k must be >= 0, got {k}")
    return int(k)


def _neighbours(q: np.ndarray, db: Any, k: int, neighbours: tuple | None) -> tuple[np.ndarray, np.ndarray]:
    if neighbours is None:
        return exact_neighbours(q, db, k)
    s, r = (np.asarray(a) for a in neighbours)
    if r.shape[0] != q.shape[0] or r.shape[1] < min(k, db.shape[0]):
        raise ConfigError(f"neighbours have shape {r.shape}, need [{q.shape[0]}, >= {k}]")
    return s[:, :k].astype(np.float32), r[:, :k].astype(np.int64)


def exact_neighbours(q: np.ndarray, db: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of ``q`` over ``db`` (:func:`irkit.search.index.exact_knn`), for callers that pass no neighbours."""
    return exact_knn(q, db, k)


def _weighted_sum(base: np.ndarray, db: Any, rows: np.ndarray, w: np.ndarray) -> np.ndarray:
    """base + sum_j w[:, j] * db[rows[:, j]]; rows of -1 contribute nothing."""
    valid = rows >= 0
    if not valid.any():
        return base.astype(np.float32)
    w = np.where(valid, w, 0.0).astype(np.float32)
    uniq, inv = np.unique(np.where(valid, rows, rows[valid][0]), return_inverse=True)
    vecs = rows_source(db)(uniq.astype(np.int64))
    gathered = vecs[inv.reshape(rows.shape)]  # [n, k, D]
    return base.astype(np.float32) + np.einsum("nk,nkd->nd", w, gathered)


def _expand(q: Any, db: Any, k: int, alpha: float | None, neighbours: tuple | None) -> Any:
    q, dev = _to_numpy(q)
    db, _ = _to_numpy(db)
    single = np.ndim(q) == 1
    q = np.atleast_2d(np.asarray(q, dtype=np.float32))
    k = min(_check_k(k), db.shape[0])
    if k == 0:
        out = l2n(q)
    else:
        s, r = _neighbours(q, db, k, neighbours)
        w = np.ones_like(s) if alpha is None else np.maximum(s, 0.0) ** float(alpha)
        out = l2n(_weighted_sum(q, db, r, w))
    return _back(out[0] if single else out, dev)


def aqe(q: Any, db: Any, k: int, *, neighbours: tuple | None = None) -> Any:
    """Average query expansion: L2(q + sum of its top-k database vectors)."""
    return _expand(q, db, k, None, neighbours)


def alpha_qe(q: Any, db: Any, k: int, alpha: float = 3.0, *, neighbours: tuple | None = None) -> Any:
    """alpha-QE: L2(q + sum_i max(s_i, 0)^alpha x_i) over the top-k database vectors."""
    if alpha < 0:
        raise ConfigError(f"alpha must be >= 0, got {alpha}")
    return _expand(q, db, k, alpha, neighbours)


def dba(db: Any, k: int, alpha: float | None = None, *, neighbours: tuple | None = None,
        batch_size: int = 8192) -> Any:
    """Database-side augmentation: each vector becomes the weighted average of itself and its top-k.

    ``neighbours``: (scores, rows) of a search of ``db`` against itself with at least k+1 columns;
    the vector itself is dropped from its list wherever it appears (else the last column is).
    """
    db, dev = _to_numpy(db)
    n = db.shape[0]
    k = min(_check_k(k), max(n - 1, 0))
    if k == 0:
        return _back(l2n(np.asarray(db)), dev)
    if alpha is not None and alpha < 0:
        raise ConfigError(f"alpha must be >= 0, got {alpha}")
    out = np.empty((n, db.shape[1]), dtype=np.float32)
    lin = (k + 1 - np.arange(1, k + 1, dtype=np.float32)) / (k + 1)
    if neighbours is None:
        neighbours = exact_neighbours(np.asarray(db, dtype=np.float32), db, k + 1)
    for s0 in range(0, n, batch_size):
        block = np.asarray(db[s0:s0 + batch_size], dtype=np.float32)
        sc = np.asarray(neighbours[0][s0:s0 + batch_size], dtype=np.float32)
        rw = np.asarray(neighbours[1][s0:s0 + batch_size], dtype=np.int64)
        if rw.shape[1] < k + 1:
            raise ConfigError(f"dba needs neighbours with >= k+1 = {k + 1} columns, got {rw.shape[1]}")
        sc, rw = sc[:, :k + 1], rw[:, :k + 1]
        self_rows = np.arange(s0, s0 + block.shape[0])[:, None]
        drop = rw == self_rows
        no_self = ~drop.any(axis=1)
        drop[no_self, -1] = True
        drop &= np.cumsum(drop, axis=1) == 1  # drop exactly one column per row
        keep = ~drop
        sc = sc[keep].reshape(-1, k)
        rw = rw[keep].reshape(-1, k)
        w = np.broadcast_to(lin, sc.shape) if alpha is None else np.maximum(sc, 0.0) ** float(alpha)
        out[s0:s0 + block.shape[0]] = l2n(_weighted_sum(block, db, rw, w))
    return _back(out, dev)


__all__ = ["aqe", "alpha_qe", "dba", "l2n"]

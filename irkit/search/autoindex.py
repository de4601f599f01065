"""Automatic index choice under a memory (and latency) budget, measured rather than guessed.

Why not autofaiss: its latest release (2.18.0) pins ``numpy<2`` while irkit's opencv-python-headless
(5.x) and pyarrow need numpy >= 2; installed beside them it fails at import ("pyarrow requires
NumPy 2.0 or newer, found 1.26.4"). Its selection also cannot use irkit's exact re-scoring from the
store, which is what makes small PQ codes accurate here. So the choice is done here, in the same
spirit: list the families that fit the memory budget (estimated per family, then the built index's
real size is measured), build them from the most to the least accurate, and tune each one's
search parameters (nprobe, efSearch, re-score depth) on held-out queries drawn from the store until
recall@k against exact search reaches the target within the latency budget.

The held-out queries are store rows; each query's own row is dropped from both the exact and the
approximate results, so the measurement is that of an unseen query from the same distribution.
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from irkit.errors import ConfigError, StoreError
from irkit.search.index import Index, default_index_path, dim_of, exact_knn, num_rows, rows_source

log = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
DEFAULT_TARGET_RECALL = 0.95
DEFAULT_RECALL_K = 10
#: below this many vectors an exact scan is fast enough that approximate indexes only lose recall
SMALL_N = 10_000
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
EF_SEARCHES = (16, 32, 64, 128, 256, 512)
RESCORE_DEPTHS = (0, 100, 300, 1000)


def parse_size(text: str | int | float) -> int:
    """'2GiB', '512MB', '1.5g', 2000000 -> bytes; ConfigError when unreadable or not positive."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"cannot read the size {text!r}; write e.g. 2GiB, 512MiB, 4GB or a number of bytes")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"a memory budget must be positive, got {text!r}")
    return int(value)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass
class Candidate:
    """One index family with its build parameters and its estimated memory."""

    family: str           # flat | ivf-flat | hnsw | ivf-pq
    factory: str
    est_bytes: int
    nlist: int | None = None
    pq_bytes: int | None = None
    hnsw_m: int | None = None


def default_nlist(n: int) -> int:
    """~4 sqrt(N) lists, a power of two, with at least 39 training points each (faiss's minimum)."""
    nlist = 1 << max(0, int(round(math.log2(4 * math.sqrt(max(n, 1))))))
    while nlist > 1 and n < 39 * nlist:
        nlist //= 2
    return nlist


FAMILIES = ("flat", "ivf-flat", "hnsw", "ivf-pq")


def candidates(n: int, dim: int, max_memory: int, families: tuple[str, ...] | None = None) -> list[Candidate]:
    """Families whose estimated memory fits ``max_memory``, the most accurate first.

    Estimates: Flat 4·D per vector; IVF adds 8 bytes of id per vector and the centroids; HNSW32 two
    lists of 32 neighbours at level 0 (4 bytes each) and ~5 % more above; PQ m bytes per vector, its
    codebooks, and exact re-scoring reads the memory-mapped store (not counted: page cache)."""
    nlist = default_nlist(n)
    centroids = nlist * dim * 4
    out = [Candidate("flat", "Flat", n * dim * 4)]
    if n > SMALL_N:
        out.append(Candidate("ivf-flat", f"IVF{nlist},Flat", n * (dim * 4 + 8) + centroids, nlist=nlist))
        out.append(Candidate("hnsw", "HNSW32", int(n * (dim * 4 + 32 * 2 * 4 * 1.05)), hnsw_m=32))
        for m in sorted({dim // s for s in (2, 4, 8, 16, 32, 64) if dim % s == 0 and dim // s >= 4}, reverse=True):
            if m > 256 or dim % m:
                continue
            out.append(Candidate("ivf-pq", f"IVF{nlist},PQ{m}", n * (m + 8) + centroids + 256 * dim * 4,
                                 nlist=nlist, pq_bytes=m))
    if families is not None:
        unknown = sorted(set(families) - set(FAMILIES))
        if unknown:
            raise ConfigError(f"unknown index families {unknown}; choose among {', '.join(FAMILIES)}")
        out = [c for c in out if c.family in families]
        if not out:
            raise ConfigError(f"none of the families {list(families)} applies to {n} vectors "
                              f"(approximate families need more than {SMALL_N})")
    fits = [c for c in out if c.est_bytes <= max_memory]
    if not fits:
        smallest = min(out, key=lambda c: c.est_bytes)
        raise ConfigError(f"no index of {n} x {dim} vectors fits in {format_bytes(max_memory)}: the smallest, "
                          f"{smallest.factory}, needs ~{format_bytes(smallest.est_bytes)}; raise --max-memory")
    return fits


@dataclass
class Trial:
    """One measured setting: what was tried and how it did."""

    factory: str
    params: dict
    recall: float
    query_ms: float        # median single-query latency
    qps: float             # batch throughput
    index_bytes: int
    ok: bool


@dataclass
class AutoIndexResult:
    index: Index
    choice: dict
    trials: list[Trial] = field(default_factory=list)

    def summary(self) -> str:
        c = self.choice
        params = ", ".join(f"{k} {v}" for k, v in c["params"].items() if v is not None) or "exact"
        return (f"chose {c['family']} ({c['factory']}; {params}): {format_bytes(c['index_bytes'])} "
                f"(budget {format_bytes(c['max_memory'])}), recall@{c['recall_k']} {c['recall']:.3f} "
                f"on {c['n_queries']} held-out queries, {c['query_ms']:.2f} ms/query, {c['qps']:.0f} q/s (batch)")


def _index_bytes(index: Index) -> int:
    return int(faiss.serialize_index(index.faiss_index).size)


def _recall(rows: np.ndarray, truth: np.ndarray, k: int) -> float:
    hits = [len(set(r[r >= 0][:k].tolist()) & set(t[:k].tolist())) for r, t in zip(rows, truth)]
    return float(np.mean(hits) / k)


def _drop_self(rows: np.ndarray, self_rows: np.ndarray, k: int) -> np.ndarray:
    out = np.full((rows.shape[0], k), -1, dtype=np.int64)
    for i, (r, s) in enumerate(zip(rows, self_rows)):
        kept = r[(r != s)][:k]
        out[i, :len(kept)] = kept
    return out


def _measure(index: Index, q: np.ndarray, self_rows: np.ndarray, truth: np.ndarray, k: int,
             rescore_k: int, n_latency: int) -> tuple[float, float, float]:
    """(recall@k, median single-query ms, batch q/s) of the current search parameters."""
    kw = {"rescore": rescore_k > 0, "rescore_k": max(rescore_k, k + 1)}
    t0 = time.perf_counter()
    _, rows = index.search(q, k + 1, **kw)
    qps = len(q) / max(time.perf_counter() - t0, 1e-9)
    times = []
    for i in range(min(n_latency, len(q))):
        t = time.perf_counter()
        index.search(q[i:i + 1], k + 1, **kw)
        times.append(time.perf_counter() - t)
    return _recall(_drop_self(rows, self_rows, k), truth, k), 1000 * float(np.median(times)), qps


def _settings(cand: Candidate, k: int) -> list[dict]:
    """Search settings of a family, cheapest first."""
    if cand.family == "flat":
        return [{}]
    if cand.family == "hnsw":
        return [{"ef_search": ef} for ef in EF_SEARCHES if ef >= k]
    probes = [p for p in NPROBES if p <= (cand.nlist or 1)]
    if cand.family == "ivf-flat":
        return [{"nprobe": p} for p in probes]
    return [{"nprobe": p, "rescore_k": r} for p in probes for r in RESCORE_DEPTHS if r == 0 or r > k]


def choose_index(vectors: Any, max_memory: int | str, *, max_query_ms: float | None = None,
                 target_recall: float = DEFAULT_TARGET_RECALL, k: int = DEFAULT_RECALL_K, n_queries: int = 200,
                 n_latency: int = 30, families: tuple[str, ...] | None = None, seed: int = 0,
                 progress: bool = True) -> AutoIndexResult:
    """Build the most accurate index family that fits ``max_memory`` and reaches ``target_recall``
    (recall@k against exact search) within ``max_query_ms`` per query, with the cheapest search
    parameters that do. ``vectors``: a FeatureStore or an [N, D] array (kept for re-scoring).

    When no setting reaches the target within the latency budget, the setting with the best recall
    among those within it (else the fastest overall) is chosen, and the choice says so.
    ``families`` restricts the choice (subset of ``FAMILIES``)."""
    max_memory = parse_size(max_memory)
    if not 0 < float(target_recall) <= 1:
        raise ConfigError(f"target recall must be in (0, 1], got {target_recall}")
    if max_query_ms is not None and not float(max_query_ms) > 0:
        raise ConfigError(f"--max-query-ms must be positive, got {max_query_ms}")
    if int(k) < 1:
        raise ConfigError(f"recall k must be positive, got {k}")
    n, dim = num_rows(vectors), dim_of(vectors)
    if n < 2:
        raise StoreError("an index needs at least 2 vectors to measure; extract more images first")
    k = min(int(k), n - 1)
    rng = np.random.default_rng(seed)
    self_rows = np.sort(rng.choice(n, size=min(int(n_queries), n), replace=False))
    q = np.ascontiguousarray(rows_source(vectors)(self_rows), dtype=np.float32)
    exact = exact_knn(q, vectors, k + 1)[1]
    truth = _drop_self(exact, self_rows, k)
    cands = candidates(n, dim, max_memory, families)
    trials: list[Trial] = []
    best: tuple[tuple, Candidate, Index, dict, Trial] | None = None
    for cand in tqdm(cands, desc="auto index", unit="family", disable=not progress):
        t0 = time.perf_counter()
        index = Index.build(vectors, cand.factory, seed=seed, progress=progress)
        build_s = time.perf_counter() - t0
        size = _index_bytes(index)
        if size > max_memory:
            log.info("auto index: %s built to %s, over the budget; skipped", cand.factory, format_bytes(size))
            continue
        reached = None
        for setting in _settings(cand, k):
            params = {key: v for key, v in setting.items() if key != "rescore_k"}
            index.set_params(**params)
            rec, ms, qps = _measure(index, q, self_rows, truth, k, setting.get("rescore_k", 0), n_latency)
            fast = max_query_ms is None or ms <= float(max_query_ms)
            trial = Trial(cand.factory, dict(setting), round(rec, 4), round(ms, 3), round(qps, 1), size,
                          ok=fast and rec >= target_recall)
            trials.append(trial)
            log.info("auto index: %s %s recall@%d %.3f, %.2f ms/query", cand.factory, setting, k, rec, ms)
            # rank: meets both > within latency (by recall) > anything (by speed)
            rank = (trial.ok, fast, rec if fast else -ms, -ms)
            if best is None or rank > best[0]:
                best = (rank, cand, index, dict(setting), trial)
            if trial.ok:
                reached = trial
                break
            if not fast and rec < target_recall and cand.family == "hnsw":
                break  # a larger efSearch is only slower
        log.info("auto index: %s built in %.1fs", cand.factory, build_s)
        if reached is not None:
            break
    if best is None:
        raise ConfigError(f"no index of {n} x {dim} vectors fits in {format_bytes(max_memory)} once built; "
                          "raise --max-memory")
    _, cand, index, setting, trial = best
    params = {"nprobe": setting.get("nprobe"), "ef_search": setting.get("ef_search")}
    index.set_params(**{k_: v for k_, v in params.items() if v is not None})
    rescore_k = int(setting.get("rescore_k", 0))
    choice = {"family": cand.family, "factory": cand.factory, "nlist": cand.nlist, "pq_bytes": cand.pq_bytes,
              "hnsw_m": cand.hnsw_m,
              "params": {**params, "rescore_k": rescore_k or None},
              "rescore": rescore_k > 0, "rescore_k": rescore_k or None,
              "recall": trial.recall, "recall_k": k, "target_recall": float(target_recall),
              "met_target": trial.recall >= target_recall,
              "query_ms": trial.query_ms, "qps": trial.qps, "max_query_ms": max_query_ms,
              "met_latency": max_query_ms is None or trial.query_ms <= float(max_query_ms),
              "index_bytes": trial.index_bytes, "est_bytes": cand.est_bytes, "max_memory": max_memory,
              "n_queries": len(self_rows), "n": n, "dim": dim}
    index.meta["auto"] = choice
    index.meta["rescore_k"] = choice["rescore_k"]
    return AutoIndexResult(index=index, choice=choice, trials=trials)


def auto_build_index(store: Any, max_memory: int | str, path: Any = None, **kwargs: Any) -> AutoIndexResult:
    """``choose_index`` on a FeatureStore, then save the index (its choice in the sidecar's ``auto``)."""
    if len(store) == 0:
        raise StoreError(f"store {store.root} is empty; extract features into it before indexing")
    result = choose_index(store, max_memory, **kwargs)
    result.index.save(path if path is not None else default_index_path(store), store=store)
    return result


__all__ = ["choose_index", "auto_build_index", "candidates", "parse_size", "format_bytes", "AutoIndexResult",
           "Candidate", "Trial"]

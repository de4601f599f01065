"""Re-ranking pipeline shared by CVNet and spatial verification.

For each query: take the top-k candidates of the global ranking, score each with a
:class:`RerankScorer`, mix ``final = global + lam * rerank``, re-sort the top-k by ``final`` and keep
the rest of the global ranking after them.

Candidate modes (METHODS.md §1):

* ``plain``: the top-k of the global ranking, what a deployment can do;
* ``protocol``: per revisitop protocol, the top-k after skipping the images that protocol ignores
  (Easy: junk ∪ hard, Medium: junk, Hard: junk ∪ easy), as the CVNet and DELG papers did. This
  needs the ground truth and gives one ranking per protocol; report which mode was used.

Scores are computed once per (query, candidate) even when several protocols share a candidate.
:class:`CVNetScorer` reads database re-rank maps from any object with ``get_map(i)`` (a
FeatureStore: prepared levels, or raw maps in older stores), keeps each image's expanded levels in
an LRU cache and batches candidates of equal map size within a memory budget, on all cores.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from tqdm import tqdm

from irkit.errors import ConfigError, RankingError
from irkit.eval.revisitop import PROTOCOLS, protocol_sets

log = logging.getLogger(__name__)

MODES = ("plain", "protocol")


@runtime_checkable
class RerankScorer(Protocol):
    """Scores candidates of one query; higher = more likely the same instance.

    ``query`` is whatever the caller hands to :func:`rerank` for that query (by default the
    query's column index); ``candidates`` are database row indices. Returns float scores
    ``[len(candidates)]``."""

    def score(self, query: Any, candidates: np.ndarray) -> np.ndarray: ...


@dataclass
class RerankOutput:
    """``ranks[name]`` is a full ranking ``[n_db, n_q]``: name ``"plain"`` in plain mode, else one
    per protocol (``"easy"``, ``"medium"``, ``"hard"``). ``scored[q]`` maps each scored database row
    of query ``q`` to its re-rank score."""

    mode: str
    k: int
    lam: float
    ranks: dict[str, np.ndarray]
    scored: list[dict[int, float]] = field(default_factory=list)


def ignored_rows(entry: dict, protocol: str) -> np.ndarray:
    """Database rows that ``protocol`` ignores for one ground-truth entry (Easy: junk ∪ hard,
    Medium: junk, Hard: junk ∪ easy)."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")
    return protocol_sets(entry, protocol)[1]


def select_candidates(ranking: np.ndarray, k: int, ignore: np.ndarray | None = None) -> np.ndarray:
    """The first ``k`` rows of ``ranking`` that are not in ``ignore`` (in ranking order)."""
    if ignore is None or len(ignore) == 0:
        return ranking[:k].copy()
    keep = ~np.isin(ranking, ignore)
    return ranking[keep][:k].copy()


def resort(ranking: np.ndarray, candidates: np.ndarray, global_scores: np.ndarray,
           rerank_scores: np.ndarray, lam: float) -> np.ndarray:
    """Candidates ordered by ``global + lam * rerank`` (stable: ties keep their global order), then
    every other row of ``ranking`` in its original order."""
    final = global_scores[candidates].astype(np.float64) + lam * np.asarray(rerank_scores, np.float64)
    order = np.argsort(-final, kind="stable")
    rest = ranking[~np.isin(ranking, candidates)]
    return np.concatenate([candidates[order], rest])


def rerank(scores: np.ndarray, scorer: RerankScorer | None, *, k: int = 100, lam: float = 0.5,
           mode: str = "plain", gnd: Sequence[dict] | None = None, ranks: np.ndarray | None = None,
           queries: Sequence[Any] | None = None, progress: bool = False) -> RerankOutput:
    """Re-rank the top-``k`` of every query.

    ``scores [n_q, n_db]`` global similarities; ``scorer`` None (or ``lam == 0``) keeps the global
    order of the candidates (no scoring); ``ranks [n_db, n_q]`` the global rankings if already
    computed (descending, stable); ``queries[j]`` what ``scorer.score`` receives for query ``j``
    (default ``j``); ``gnd`` the revisitop ground truth, required by ``mode="protocol"``.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise RankingError(f"scores must be [n_queries, n_db], got shape {scores.shape}")
    nq, n_db = scores.shape
    if mode not in MODES:
        raise ConfigError(f"unknown re-rank candidate mode {mode!r}; use one of {MODES}")
    if k < 1:
        raise ConfigError(f"re-rank top-k must be >= 1, got {k}")
    if not math.isfinite(lam):
        raise ConfigError(f"re-rank lambda must be a finite number, got {lam}")
    if mode == "protocol" and (gnd is None or len(gnd) != nq):
        raise ConfigError("protocol-aware re-ranking needs the ground truth of every query "
                          f"({nq} queries, got {None if gnd is None else len(gnd)}); use mode 'plain'")
    if ranks is None:
        ranks = np.argsort(-scores, axis=1, kind="stable").T
    elif ranks.shape != (n_db, nq):
        raise RankingError(f"ranks must be [n_db, n_q] = {(n_db, nq)}, got {ranks.shape}")
    if queries is not None and len(queries) != nq:
        raise ConfigError(f"got {len(queries)} query handles for {nq} queries")
    names = ("plain",) if mode == "plain" else PROTOCOLS
    out = {name: np.empty((n_db, nq), dtype=np.int64) for name in names}
    scored: list[dict[int, float]] = []
    use_scorer = scorer is not None and lam != 0
    for j in tqdm(range(nq), desc="re-rank", unit="query", disable=not progress):
        ranking = np.asarray(ranks[:, j], dtype=np.int64)
        cands = {name: select_candidates(ranking, k, None if mode == "plain" else ignored_rows(gnd[j], name))
                 for name in names}
        cache: dict[int, float] = {}
        if use_scorer:
            todo = np.unique(np.concatenate(list(cands.values())))
            todo = todo[np.argsort(_positions(ranking, todo), kind="stable")]
            values = np.asarray(scorer.score(j if queries is None else queries[j], todo), dtype=np.float64)
            if values.shape != (len(todo),):
                raise RankingError(f"scorer returned {values.shape} scores for {len(todo)} candidates")
            cache = dict(zip(todo.tolist(), values.tolist()))
        for name in names:
            c = cands[name]
            rs = np.array([cache.get(int(i), 0.0) for i in c], dtype=np.float64)
            out[name][:, j] = resort(ranking, c, scores[j], rs, lam if use_scorer else 0.0)
        scored.append(cache)
    return RerankOutput(mode=mode, k=k, lam=lam, ranks=out, scored=scored)


def _positions(ranking: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Position of each of ``rows`` in ``ranking`` (so candidates are scored best-first)."""
    inv = np.empty(len(ranking), dtype=np.int64)
    inv[ranking] = np.arange(len(ranking))
    return inv[rows]


# ------------------------------------------------------------------------------------ CVNet scorer

class CVNetScorer:
    """Scores candidates with a :class:`~irkit.models.cvnet.CVNetReranker`.

    ``database``/``queries``: objects with ``get_map(i)`` (FeatureStores) returning what extraction
    stored: packed prepared levels (current stores) or a raw map ``[C, h, w]`` (older stores,
    projected here once). ``score`` accepts as query an int (row of ``queries``), a stored/raw map
    (numpy or tensor), or prepared levels. Each database image's expanded levels (what the fast
    route reads, :meth:`CVNetReranker.expand`) are kept in an LRU cache of ``cache_bytes``;
    candidates of equal map size are scored in batches whose estimated working memory stays within
    ``memory_budget`` bytes (batches share the query's half of the correlation: on CPU 4 pairs at
    once cost 0.6x the time of 4 single pairs); ``chunk_bytes`` bounds each piece of the
    correlation. ``threads`` sets torch's intra-op threads while scoring (default: torch's setting,
which is every core unless the program narrowed it; :func:`cores` counts the usable ones).
    """

    def __init__(self, reranker: torch.nn.Module, database: Any, queries: Any = None, *,
                 cache_bytes: int = 2 << 30, memory_budget: int | None = None,
                 chunk_bytes: int = 64 << 20, device: str | torch.device | None = None,
                 threads: int | None = None) -> None:
        if not hasattr(database, "get_map"):
            raise ConfigError("the CVNet scorer needs database re-rank maps: an object with get_map(i), "
                              "e.g. a FeatureStore extracted with maps")
        if getattr(database, "has_maps", True) is False:
            raise ConfigError("the database store has no re-rank maps; extract it again with maps enabled")
        self.reranker = reranker.eval()
        self.database = database
        self.queries = queries
        self.cache_bytes = int(cache_bytes)
        self.chunk_bytes = int(chunk_bytes)
        self.device = torch.device(device) if device is not None else next(reranker.parameters()).device
        if memory_budget is None:
            memory_budget = (2 << 30) if self.device.type == "cuda" else (1 << 30)
        self.memory_budget = int(memory_budget)
        self.threads = threads
        self._cache: OrderedDict[int, Any] = OrderedDict()
        self._cached_bytes = 0
        self.hits = 0
        self.misses = 0

    # -- preparing ------------------------------------------------------------------------------
    @torch.inference_mode()
    def prepare(self, fmap: np.ndarray | torch.Tensor) -> list[torch.Tensor]:
        """A stored map (packed levels or a raw [C, h, w] map) -> prepared levels [1, 256, h_l, w_l]."""
        t = torch.as_tensor(np.asarray(fmap) if not isinstance(fmap, torch.Tensor) else fmap)
        t = t.to(self.device, torch.float32)
        if hasattr(self.reranker, "levels_of"):
            return self.reranker.levels_of(t)
        return self.reranker.prepare(t if t.dim() == 4 else t.unsqueeze(0))

    def _query_levels(self, query: Any) -> list[torch.Tensor]:
        if isinstance(query, (list, tuple)) and query and isinstance(query[0], torch.Tensor):
            return [lv.to(self.device) for lv in query]
        if isinstance(query, (int, np.integer)):
            if self.queries is None or not hasattr(self.queries, "get_map"):
                raise ConfigError("query given by index but the scorer has no query maps (pass queries=store)")
            return self.prepare(self.queries.get_map(int(query)))
        return self.prepare(query)

    def levels(self, row: int) -> Any:
        """Expanded levels of database row ``row`` (LRU-cached)."""
        row = int(row)
        hit = self._cache.get(row)
        if hit is not None:
            self._cache.move_to_end(row)
            self.hits += 1
            return hit
        self.misses += 1
        with torch.inference_mode():
            ex = self._expand(self.prepare(self.database.get_map(row)))
        size = _nbytes(ex)
        if size <= self.cache_bytes:
            self._cache[row] = ex
            self._cached_bytes += size
            while self._cached_bytes > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= _nbytes(old)
        return ex

    def _expand(self, levels: list[torch.Tensor]) -> Any:
        return self.reranker.expand(levels) if hasattr(self.reranker, "expand") else levels

    def _size(self, ex: Any) -> tuple[int, int]:
        return tuple(ex.size) if hasattr(ex, "size") and not isinstance(ex, list) else self.reranker.full_size(ex)

    # -- scoring ----------------------------------------------------------------------------------
    def pair_bytes(self, q_size: tuple[int, int], k_size: tuple[int, int], stride: int = 2) -> int:
        """Estimated peak working memory one more candidate adds to a batch (float32): three
        copies of the first layer's 16-channel output (its two halves and their sum), the
        candidate's piece of a correlation chunk and its expanded levels."""
        cells = 1
        for n in (*q_size, *k_size):
            cells *= -(-n // stride)
        n_levels = len(getattr(self.reranker, "scales", (0, 0, 0)))
        return 3 * 16 * 4 * cells + 2 * n_levels * 256 * 4 * (k_size[0] * k_size[1] + q_size[0] * q_size[1])

    @torch.inference_mode()
    def score(self, query: Any, candidates: Sequence[int] | np.ndarray) -> np.ndarray:
        """P(same instance) of each candidate row, float32 ``[len(candidates)]``."""
        cands = np.asarray(candidates, dtype=np.int64).ravel()
        out = np.zeros(len(cands), dtype=np.float32)
        if len(cands) == 0:
            return out
        before = torch.get_num_threads()
        want = self.threads or before
        if self.device.type == "cpu" and want != before:
            torch.set_num_threads(want)
        try:
            qx = self._expand(self._query_levels(query))
            q_size = self._size(qx)
            # stream the candidates: group by map size, score a group as soon as it fills a batch, so
            # at most one batch of expanded maps per size is held besides the cache
            pending: dict[tuple[int, int], list[tuple[int, Any]]] = {}
            for pos, row in enumerate(cands.tolist()):
                ex = self.levels(row)
                k_size = self._size(ex)
                group = pending.setdefault(k_size, [])
                group.append((pos, ex))
                if len(group) >= self.batch_size(q_size, k_size):
                    self._score_batch(qx, group, out)
                    group.clear()
            for group in pending.values():
                if group:
                    self._score_batch(qx, group, out)
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)
        return out

    def batch_size(self, q_size: tuple[int, int], k_size: tuple[int, int]) -> int:
        """Candidates of map size ``k_size`` scored together within ``memory_budget``."""
        return max(1, self.memory_budget // max(1, self.pair_bytes(q_size, k_size)))

    def _score_batch(self, qx: Any, group: list[tuple[int, Any]], out: np.ndarray) -> None:
        kx = _stack([ex for _, ex in group])
        s = self.reranker.score(qx, kx, chunk_bytes=self.chunk_bytes)
        out[[pos for pos, _ in group]] = s.float().cpu().numpy()

    def clear_cache(self) -> None:
        self._cache.clear()
        self._cached_bytes = 0


def cores() -> int:
    """CPU cores this process may run on (the affinity mask, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _nbytes(ex: Any) -> int:
    if isinstance(ex, (list, tuple)):
        return sum(t.numel() * t.element_size() for t in ex)
    return ex.nbytes()


def _stack(items: list[Any]) -> Any:
    """One batch of candidates: expanded levels stacked along the batch (or raw level lists)."""
    first = items[0]
    if isinstance(first, (list, tuple)):
        return [torch.cat([lv[i] for lv in items]) for i in range(len(first))]
    if len(items) == 1:
        return first
    return dataclasses.replace(first, dense=torch.cat([e.dense for e in items]),
                               pivots=torch.cat([e.pivots for e in items]))

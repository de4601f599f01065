"""GLDv2 retrieval metric: mAP@100 as defined for the Kaggle challenge.

For each query of the chosen split: AP@k = sum_{i<=k} P(i) * rel(i) / min(n_relevant, k), where
rel(i) = 1 when the i-th prediction is relevant and was not already predicted above it (repeated
predictions earn nothing), P(i) = precision at i. Only the first k predictions count; a query with
no predictions scores 0. Returned in percent.
"""
from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np

from irkit.data.gldv2 import RetrievalSolution
from irkit.errors import RankingError

log = logging.getLogger(__name__)


def ap_at_k(predictions: Sequence[str], relevant: set[str] | Sequence[str], k: int = 100) -> float:
    """AP@k (fraction) of one query."""
    rel = relevant if isinstance(relevant, set) else set(relevant)
    if not rel:
        raise RankingError("AP@k is undefined for a query without relevant images")
    hits, total = 0, 0.0
    seen: set[str] = set()
    for i, pred in enumerate(list(predictions)[:k], 1):
        if pred in rel and pred not in seen:
            hits += 1
            total += hits / i
        seen.add(pred)
    return total / min(len(rel), k)


def evaluate_gldv2(predictions: Mapping[str, Sequence[str]], solution: RetrievalSolution,
                   split: str = "private", k: int = 100) -> dict:
    """mAP@k over the split's queries: ``{"map@k": %, "aps": {query_id: %}, "n_queries": int,
    "n_missing": int}``; queries absent from ``predictions`` score 0 (and are counted)."""
    if k < 1:
        raise RankingError(f"k must be >= 1, got {k}")
    queries = solution.queries(split)
    if not queries:
        raise RankingError(f"the solution has no {split} queries")
    aps: dict[str, float] = {}
    missing = 0
    for q in queries:
        preds = predictions.get(q)
        if preds is None:
            missing += 1
            preds = ()
        elif isinstance(preds, str):
            preds = preds.split()
        aps[q] = 100.0 * ap_at_k(preds, solution.relevant[q], k)
    if missing:
        log.warning("%d of %d %s queries have no predictions (scored 0)", missing, len(queries), split)
    return {f"map@{k}": float(np.mean(list(aps.values()))), "aps": aps,
            "n_queries": len(queries), "n_missing": missing}


def predictions_from_ranks(ranks: np.ndarray, query_ids: Sequence[str], index_ids: Sequence[str],
                           k: int = 100) -> dict[str, list[str]]:
    """Turn a query-major top-k index matrix ``[n_q, >=k]`` (rows into ``index_ids``) into predictions."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[0] != len(query_ids):
        raise RankingError(f"ranks must be [n_queries={len(query_ids)}, k], got shape {ranks.shape}")
    if ranks.dtype.kind not in "iu":
        raise RankingError(f"ranks must hold integer indices, got dtype {ranks.dtype}")
    if ranks.size and (ranks.min() < 0 or ranks.max() >= len(index_ids)):
        raise RankingError(f"ranks holds indices outside [0, {len(index_ids)})")
    top = ranks[:, :k]
    return {q: [index_ids[i] for i in row] for q, row in zip(query_ids, top.tolist())}

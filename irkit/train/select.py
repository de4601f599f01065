"""Choosing a re-ranker's mixing weight λ and top-k on a validation split (never on the test set).

The final score of a re-ranked candidate is ``global + λ · rerank`` (METHODS §2); the candidates
are each query's global top-k, re-ordered among themselves, the rest keep their global order (as
:func:`irkit.search.rerank.resort`). :func:`select_rerank` scores every query's top-``max(topks)``
once, then evaluates every (λ, k) of the grid by mAP on the validation queries (positives = the
query's class, the query itself ignored) and keeps the best, the smallest λ and k on ties. λ = 0
(global order) is always in the grid, so the choice never lowers validation mAP: a weak re-ranker
ends with a small λ (or 0) instead of wrecking the ranking.

The choice is saved as ``rerank.json`` next to the checkpoint (:func:`save_rerank_choice`) and read
back with :func:`load_rerank_choice` (``irkit eval --rerank cvnet`` can use it as its defaults).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from irkit.errors import ConfigError
from irkit.eval.revisitop import evaluate_ranks, ranks_from_scores
from irkit.utils import atomic_write_json

__all__ = ["DEFAULT_LAMBDAS", "DEFAULT_TOPKS", "RERANK_FILE", "select_rerank", "save_rerank_choice",
           "load_rerank_choice", "label_gnd", "labelled_map"]

DEFAULT_LAMBDAS = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
DEFAULT_TOPKS = (10, 25, 50, 100)
RERANK_FILE = "rerank.json"


def label_gnd(query_labels: Sequence[int], db_labels: Sequence[int],
              query_db_rows: Sequence[int] | None = None) -> list[dict]:
    """revisitop-style ground truth of a labelled set: positives (``easy``) = database rows of the
    query's label; ``junk`` = the query's own row (``query_db_rows[j]``, -1 = not in the database)."""
    db = np.asarray(db_labels)
    out = []
    for j, lab in enumerate(np.asarray(query_labels).tolist()):
        own = -1 if query_db_rows is None else int(query_db_rows[j])
        pos = [int(i) for i in np.flatnonzero(db == lab) if i != own]
        out.append({"easy": pos, "hard": [], "junk": [own] if own >= 0 else [], "bbx": None})
    return out


def labelled_map(x: np.ndarray, labels: Sequence[int], n_queries: int) -> float:
    """mAP (%) of the first ``n_queries`` rows of ``x`` (L2-normalised descriptors), each querying
    every row: positives = the rows of its label, its own row ignored (:func:`label_gnd`, Easy).
    The rows after the queries are the database's distractors and positives."""
    labels = np.asarray(labels)
    gnd = label_gnd(labels[:n_queries], labels, np.arange(n_queries))
    ranks = ranks_from_scores(x @ x[:n_queries].T)                      # [n_db, n_queries]
    return float(evaluate_ranks(ranks, gnd, protocols=("easy",))["easy"]["map"])


def _resort(order: np.ndarray, sim: np.ndarray, rr: np.ndarray, k: int, lam: float) -> np.ndarray:
    cand = order[:k]
    final = sim[cand].astype(np.float64) + lam * rr[:k].astype(np.float64)
    return np.concatenate([cand[np.argsort(-final, kind="stable")], order[k:]])


def select_rerank(sim: np.ndarray, gnd: list[dict], score: Callable[[int, np.ndarray], np.ndarray],
                  lambdas: Sequence[float] = DEFAULT_LAMBDAS, topks: Sequence[int] = DEFAULT_TOPKS,
                  protocol: str = "easy", min_gain: float = 0.0) -> dict[str, Any]:
    """Pick (λ, top-k) maximising validation mAP.

    ``sim [n_q, n_db]`` global similarities; ``gnd`` per query (:func:`label_gnd`); ``score(j,
    rows)`` the re-rank scores of query ``j`` against database ``rows`` (called once per query with
    its global top-``max(topks)``, junk rows skipped). Returns ``{"lambda", "topk", "val_map",
    "val_map_global", "grid": [{lambda, topk, map}, ...], "n_queries", "lambdas", "topks"}``.
    ``min_gain`` (mAP points): keep λ = 0 unless the best re-ranking beats the global ranking on
    validation by at least that much (a gain of a few hundredths of a point on a few dozen queries
    is noise, and it need not carry over to other data); ``best_*`` report the unguarded optimum."""
    sim = np.asarray(sim, dtype=np.float32)
    if sim.ndim != 2 or sim.shape[0] != len(gnd):
        raise ConfigError(f"select_rerank: {sim.shape} similarities for {len(gnd)} queries")
    lambdas = sorted({float(v) for v in lambdas} | {0.0})
    if any(not np.isfinite(v) or v < 0 for v in lambdas):
        raise ConfigError(f"select_rerank: lambdas must be finite and >= 0, got {lambdas}")
    topks = sorted({int(k) for k in topks})
    if not topks or topks[0] < 1:
        raise ConfigError(f"select_rerank: top-k values must be >= 1, got {topks}")
    n_q, n_db = sim.shape
    kmax = min(topks[-1], n_db)
    orders, rrs = [], []
    for j in range(n_q):
        order = np.argsort(-sim[j], kind="stable")
        junk = set(gnd[j].get("junk", []))
        order = np.asarray([i for i in order if i not in junk] + [i for i in order if i in junk])
        orders.append(order)
        rrs.append(np.asarray(score(j, order[:kmax]), dtype=np.float64).reshape(-1))
    grid = []
    for k in topks:
        kk = min(k, n_db)
        for lam in lambdas:
            ranks = np.stack([_resort(orders[j], sim[j], rrs[j], kk, lam) for j in range(n_q)], axis=1)
            grid.append({"lambda": lam, "topk": k, "map": float(evaluate_ranks(ranks, gnd, protocols=(protocol,))[protocol]["map"])})
    base = next(g["map"] for g in grid if g["lambda"] == 0.0)
    if min_gain < 0 or not np.isfinite(min_gain):
        raise ConfigError(f"select_rerank: min_gain must be >= 0, got {min_gain}")
    raw = max(grid, key=lambda g: (round(g["map"], 6), -g["lambda"], -g["topk"]))
    best = raw
    if best["lambda"] == 0.0 or best["map"] - base < min_gain:
        best = {"lambda": 0.0, "topk": topks[0], "map": base}
    return {"lambda": best["lambda"], "topk": best["topk"], "val_map": best["map"], "val_map_global": base,
            "best_lambda": raw["lambda"], "best_topk": raw["topk"], "best_val_map": raw["map"], "min_gain": min_gain,
            "grid": grid, "n_queries": n_q, "protocol": protocol, "lambdas": lambdas, "topks": topks}


def save_rerank_choice(choice: dict[str, Any], folder: str | Path, **extra: Any) -> Path:
    """Write ``folder/rerank.json`` (λ, top-k, validation mAP with and without re-ranking, grid)."""
    path = Path(folder) / RERANK_FILE
    atomic_write_json(path, {**choice, **extra})
    return path


def load_rerank_choice(weights: str | Path | None) -> dict[str, Any] | None:
    """The ``rerank.json`` beside a checkpoint file (or in a run folder), None when there is none;
    a malformed file raises ConfigError naming it."""
    if not weights:
        return None
    p = Path(weights)
    path = (p if p.is_dir() else p.parent) / RERANK_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        lam, k = float(data["lambda"]), int(data["topk"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a re-rank choice (needs lambda and topk): {exc}") from exc
    if not np.isfinite(lam) or lam < 0 or k < 1:
        raise ConfigError(f"{path}: lambda must be >= 0 and topk >= 1, got {lam}, {k}")
    return {**data, "lambda": lam, "topk": k}

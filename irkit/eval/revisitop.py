"""The Revisited Oxford/Paris evaluation protocol (mAP and mP@k for Easy, Medium and Hard).

Semantics follow the official revisitop evaluator (METHODS.md §1): ignored images are removed
from the ranking, AP uses the trapezoidal precision of each positive, queries without positives
are excluded from the means (their AP is reported as NaN). All values are percentages.

The core, :func:`evaluate_positions`, only needs the 0-based positions of the positives and of
the ignored images of each query in its ranking, so a streaming evaluator (+1M distractors,
rankings never materialised) can feed it. :func:`evaluate_ranks` builds those positions from
rankings of any depth (top-k or full; positives beyond the depth count as not retrieved, as in
the official ``compute_map``) with one scatter per query: O(depth) numpy work per query, no
Python loop over the database.
"""
from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import numpy as np

from irkit.errors import ConfigError, RankingError

log = logging.getLogger(__name__)

PROTOCOLS = ("easy", "medium", "hard")
DEFAULT_KAPPAS = (1, 5, 10)


def protocol_sets(entry: dict, protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """(positives, ignored) database indices of one gnd entry under ``protocol`` (unique, sorted):
    Easy = easy / junk + hard, Medium = easy + hard / junk, Hard = hard / junk + easy."""
    easy = np.asarray(entry["easy"], dtype=np.int64)
    hard = np.asarray(entry["hard"], dtype=np.int64)
    junk = np.asarray(entry["junk"], dtype=np.int64)
    if protocol == "easy":
        pos, ign = easy, np.concatenate([junk, hard])
    elif protocol == "medium":
        pos, ign = np.concatenate([easy, hard]), junk
    elif protocol == "hard":
        pos, ign = hard, np.concatenate([junk, easy])
    else:
        raise ConfigError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")
    return np.unique(pos), np.unique(ign)


def average_precision(pos: np.ndarray, ign: np.ndarray, n_pos: int | None = None) -> float:
    """AP (fraction) from sorted 0-based positions of positives and ignored images in one ranking.

    ``n_pos`` is the number of positives of the query (default ``len(pos)``); positives missing
    from ``pos`` (e.g. beyond a truncated ranking) contribute 0.
    """
    n = len(pos) if n_pos is None else int(n_pos)
    if n == 0 or len(pos) == 0:
        return 0.0
    adj = _adjusted(pos, ign)
    j = np.arange(len(adj), dtype=np.float64)
    r = adj.astype(np.float64)
    prec_before = np.divide(j, r, out=np.ones_like(r), where=r > 0)
    prec_after = (j + 1.0) / (r + 1.0)
    return float(np.sum(prec_before + prec_after) / 2.0 / n)


def _adjusted(pos: np.ndarray, ign: np.ndarray) -> np.ndarray:
    """Positions after removing ignored images: each minus the ignored ranked strictly before it."""
    pos = np.asarray(pos, dtype=np.int64)
    if len(ign) == 0:
        return pos
    return pos - np.searchsorted(np.asarray(ign, dtype=np.int64), pos, side="left")


def precision_at(pos: np.ndarray, ign: np.ndarray, kappas: Sequence[int] = DEFAULT_KAPPAS) -> np.ndarray:
    """mP@k terms of one query (fractions): kq = min(last positive's 1-based adjusted rank, k)."""
    out = np.zeros(len(kappas), dtype=np.float64)
    if len(pos) == 0:
        return out
    p1 = _adjusted(pos, ign) + 1
    last = int(p1.max())
    for i, k in enumerate(kappas):
        kq = min(last, int(k))
        out[i] = np.count_nonzero(p1 <= kq) / kq
    return out


def evaluate_positions(pos_ranks: Sequence[np.ndarray], ign_ranks: Sequence[np.ndarray],
                       n_pos: Sequence[int] | None = None, kappas: Sequence[int] = DEFAULT_KAPPAS) -> dict:
    """One protocol over all queries from positions only.

    ``pos_ranks[q]`` / ``ign_ranks[q]``: 0-based positions in query q's full ranking of its
    positives / ignored images (any order). ``n_pos[q]``: its number of positives (default
    ``len(pos_ranks[q])``); a query with ``n_pos == 0`` is excluded (AP NaN).
    Returns ``{"map": %, "mp@k": %..., "aps": ndarray[n_q] %}``.
    """
    if len(pos_ranks) != len(ign_ranks):
        raise RankingError(f"got positions of positives for {len(pos_ranks)} queries but of ignored "
                           f"images for {len(ign_ranks)}")
    nq = len(pos_ranks)
    counts = [len(p) for p in pos_ranks] if n_pos is None else [int(n) for n in n_pos]
    if len(counts) != nq:
        raise RankingError(f"n_pos has {len(counts)} entries for {nq} queries")
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(kappas)), np.nan)
    for q in range(nq):
        if counts[q] == 0:
            continue
        pos = np.sort(np.asarray(pos_ranks[q], dtype=np.int64))
        ign = np.sort(np.asarray(ign_ranks[q], dtype=np.int64))
        if len(pos) > counts[q]:
            raise RankingError(f"query {q}: {len(pos)} positive positions but n_pos = {counts[q]}")
        aps[q] = average_precision(pos, ign, counts[q])
        prs[q] = precision_at(pos, ign, kappas)
    valid = ~np.isnan(aps)
    result: dict = {}
    if not valid.any():
        log.warning("no query has positives under this protocol; mAP and mP@k are NaN")
        result["map"] = math.nan
        for k in kappas:
            result[f"mp@{k}"] = math.nan
    else:
        result["map"] = float(aps[valid].mean() * 100.0)
        means = prs[valid].mean(axis=0) * 100.0
        for k, v in zip(kappas, means):
            result[f"mp@{k}"] = float(v)
    result["aps"] = aps * 100.0
    return result


def check_ranks(ranks: np.ndarray, n_queries: int | None = None, n_db: int | None = None) -> np.ndarray:
    """Validate rankings [depth, n_q] of any depth: 2-D, integer, non-empty, indices >= 0 and, when
    the database size ``n_db`` is known, below it (and the depth at most ``n_db``).

    Distinct indices per column are checked by :func:`evaluate_ranks` (it builds the inverse anyway).
    """
    if not isinstance(ranks, np.ndarray):
        raise RankingError(f"ranks must be a numpy array, got {type(ranks).__name__}")
    if ranks.ndim != 2:
        raise RankingError(f"ranks must be 2-D [depth, n_queries], got shape {ranks.shape}")
    if ranks.dtype.kind not in "iu":
        hint = " (these look like scores: use ranks_from_scores / --scores)" if ranks.dtype.kind == "f" else ""
        raise RankingError(f"ranks must hold integer database indices, got dtype {ranks.dtype}{hint}")
    rows, cols = ranks.shape
    if n_queries is not None and cols != n_queries:
        flip = " (it looks query-major: transpose it, or pass --query-major)" if rows == n_queries else ""
        raise RankingError(f"ranks has shape {ranks.shape} but the ground truth has {n_queries} queries; "
                           f"expected [depth, {n_queries}]{flip}")
    if rows == 0 or cols == 0:
        raise RankingError(f"ranks is empty (shape {ranks.shape}): need [depth, n_queries] with both > 0")
    if n_db is not None and rows > n_db:
        raise RankingError(f"ranks has {rows} rows but the database has {n_db} images; a ranking lists each "
                           "database image at most once (distractors appended to the database count in n_db)")
    lo = int(ranks.min())
    if lo < 0:
        r, q = np.argwhere(ranks == lo)[0]
        raise RankingError(f"ranks holds the negative index {lo} (query {q}, rank {r}); indices are 0-based "
                           "positions in the database")
    hi = int(ranks.max())
    if n_db is not None and hi >= n_db:
        r, q = np.argwhere(ranks == hi)[0]
        raise RankingError(f"ranks holds database index {hi} (query {q}, rank {r}) but the database has "
                           f"{n_db} images (indices 0..{n_db - 1}); are the indices 1-based, or are "
                           "distractors missing from n_db?")
    return ranks


def _gnd_entries(gnd: Sequence[dict] | Mapping) -> tuple[Sequence[dict], int | None]:
    """(per-query entries, database size or None) from a gnd list or a whole ground-truth dict."""
    if isinstance(gnd, Mapping):
        if "gnd" not in gnd or "imlist" not in gnd:
            raise RankingError("a ground-truth dict needs 'gnd' and 'imlist' (as load_gnd returns); "
                               "or pass its 'gnd' list")
        return gnd["gnd"], len(gnd["imlist"])
    return gnd, None


def evaluate_ranks(ranks: np.ndarray, gnd: Sequence[dict] | Mapping, kappas: Sequence[int] = DEFAULT_KAPPAS,
                   n_db: int | None = None, protocols: Sequence[str] = PROTOCOLS) -> dict:
    """mAP / mP@k of the three protocols from rankings ``ranks[depth, n_q]`` (0-based database
    indices, best first), exactly as revisitop's ``compute_map``.

    Any depth is accepted, from a top-k to the full database: a positive absent from a column counts
    as not retrieved (it adds 0 to the AP, whose denominator stays the query's number of positives),
    and ignored images absent from it change nothing. Where ``compute_map`` fails (a query whose
    truncated ranking holds none of its positives: it takes the max of no positions), mP@k is 0.
    ``gnd``: the per-query entries, or the whole ground truth (``load_gnd``'s dict). ``n_db``: the
    number of images the indices address (the database, plus any distractors numbered after it);
    default ``len(gnd["imlist"])`` for a whole ground truth, else unknown: indices are then only
    checked to be non-negative. Each column must list an image at most once.
    ``protocols``: the ones to score (label-based validation has only "easy" positives).
    Returns ``{"easy"|"medium"|"hard": {"map", "mp@k"..., "aps"}}`` in percent.
    """
    entries, gt_db = _gnd_entries(gnd)
    n_db = gt_db if n_db is None else int(n_db)
    check_ranks(ranks, n_queries=len(entries), n_db=n_db)
    rows, nq = ranks.shape
    sets = [{p: protocol_sets(e, p) for p in protocols} for e in entries]
    gnd_hi = -1
    for q, s in enumerate(sets):
        hi = max((int(a.max()) for pair in s.values() for a in pair if a.size), default=-1)
        lo = min((int(a.min()) for pair in s.values() for a in pair if a.size), default=0)
        if lo < 0:
            raise RankingError(f"ground truth of query {q} refers to the negative database index {lo}")
        if n_db is not None and hi >= n_db:
            raise RankingError(f"ground truth of query {q} refers to database index {hi} but the database has "
                               f"{n_db} images")
        gnd_hi = max(gnd_hi, hi)
    size = max(n_db or 0, int(ranks.max()) + 1, gnd_hi + 1)
    idx_dtype = np.int32 if size < 2**31 else np.int64
    inverse = np.full(size, -1, dtype=idx_dtype)     # inverse[i] = rank of image i, -1 = not ranked
    positions = np.arange(rows, dtype=idx_dtype)
    # a strided column makes the scatter below 3x slower: copy it to a contiguous buffer first
    column = None if ranks[:, 0].flags.c_contiguous else np.empty(rows, dtype=ranks.dtype)
    pos_all: dict[str, list[np.ndarray]] = {p: [] for p in protocols}
    ign_all: dict[str, list[np.ndarray]] = {p: [] for p in protocols}
    n_pos: dict[str, list[int]] = {p: [] for p in protocols}
    for q in range(nq):
        col = ranks[:, q]
        if column is not None:
            np.copyto(column, col)
            col = column
        inverse[col] = positions
        if not np.array_equal(inverse[col], positions):
            first = int(np.flatnonzero(inverse[col] != positions)[0])
            raise RankingError(f"ranking of query {q} repeats database index {int(col[first])} (ranks {first} "
                               f"and {int(inverse[col[first]])}); a ranking lists each image at most once")
        for p in protocols:
            pos, ign = sets[q][p]
            found, found_ign = inverse[pos], inverse[ign]
            pos_all[p].append(found[found >= 0])
            ign_all[p].append(found_ign[found_ign >= 0])
            n_pos[p].append(len(pos))
        inverse[col] = -1                            # O(depth) reset: top-k of a 1M database stays cheap
    return {p: evaluate_positions(pos_all[p], ign_all[p], n_pos=n_pos[p], kappas=kappas) for p in protocols}


def ranks_from_scores(scores: np.ndarray) -> np.ndarray:
    """Rank by descending score per column (stable: ties keep the lower database index first)."""
    if not isinstance(scores, np.ndarray) or scores.ndim != 2:
        shape = getattr(scores, "shape", None)
        raise RankingError(f"scores must be a 2-D array [n_db, n_queries], got {type(scores).__name__} {shape}")
    if scores.dtype.kind not in "fiub":
        raise RankingError(f"scores must be numeric, got dtype {scores.dtype}")
    if scores.dtype.kind != "f":
        scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        raise RankingError("scores contain NaN or infinite values")
    return np.argsort(-scores, axis=0, kind="stable")


def format_table(results: dict, kappas: Sequence[int] = DEFAULT_KAPPAS) -> str:
    """A fixed-width E/M/H table of mAP and mP@k (percent, 2 decimals)."""
    header = f"{'':8s}{'mAP':>8s}" + "".join(f"{'mP@' + str(k):>8s}" for k in kappas)
    lines = [header]
    for p in PROTOCOLS:
        if p not in results:
            continue
        r = results[p]
        vals = [r["map"]] + [r.get(f"mp@{k}", math.nan) for k in kappas]
        lines.append(f"{p.capitalize():8s}" + "".join(f"{v:8.2f}" for v in vals))
    return "\n".join(lines)

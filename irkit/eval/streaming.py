"""Exact revisitop evaluation with a huge distractor set (+1M), streamed in chunks.

Why: the +1M protocol appends ~1M distractors to the database. Materialising the ranking
([1M, 70] indices) or the scores in float64 costs gigabytes and a 70 x 1M argsort. The protocol
only needs, per query, the 0-based positions of its positives and ignored images in the full
ranking (see :func:`irkit.eval.revisitop.evaluate_positions`). Those images are database images
with known indices, so we keep their scores ("tracked" scores) and, while streaming the
distractors, count how many score strictly higher than each of them.

Exactness: the reference ranking is a stable argsort of ``-scores`` over database followed by
distractors. A tracked database image ``i`` with score ``s`` is therefore preceded by the database
images scoring more than ``s`` or scoring exactly ``s`` with a lower index, plus *every distractor
scoring strictly more than* ``s`` (a distractor's index is larger, so a tie puts it after). Both
counts are computed from the same float32 scores the full ranking would sort, so the positions
(and every AP / mP@k) are identical, not approximately equal.

Scores are ``query @ chunk.T`` in float32 (the dtype the descriptors have). Per chunk the work is
one matmul plus, per query, a ``searchsorted`` of the chunk's scores into the query's few hundred
sorted tracked scores and a ``bincount``: O(n_q * chunk) memory, nothing of size n_q * 1M.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from irkit.data.distractors import load_distractors
from irkit.errors import ConfigError, RankingError, StoreError
from irkit.eval.revisitop import DEFAULT_KAPPAS, PROTOCOLS, evaluate_positions, protocol_sets
from irkit.extract import Item, check_scales, extract_to_store, model_config
from irkit.store import FeatureStore, config_hash
from irkit.utils import cache_root

log = logging.getLogger(__name__)

#: distractor rows per chunk when streaming from a store (64k x 2048 float32 = 512 MiB at most)
DEFAULT_CHUNK = 65536


def _tracked_sets(gnd: Sequence[dict], n_db: int) -> list[np.ndarray]:
    """Per query: sorted unique database indices that any protocol needs (easy ∪ hard ∪ junk)."""
    out = []
    for q, entry in enumerate(gnd):
        idx = np.unique(np.concatenate([np.asarray(entry[k], dtype=np.int64).ravel()
                                        for k in ("easy", "hard", "junk")]))
        if idx.size and (idx[0] < 0 or idx[-1] >= n_db):
            raise RankingError(f"ground truth of query {q} refers to database index {int(idx[-1])} "
                               f"outside the {n_db} database descriptors")
        out.append(idx)
    return out


def _db_positions(scores: np.ndarray, tracked: np.ndarray) -> np.ndarray:
    """0-based positions of ``tracked`` rows in the stable descending ranking of one score vector."""
    order = np.argsort(-scores, kind="stable")
    inv = np.empty_like(order)
    inv[order] = np.arange(order.size)
    return inv[tracked]


class _Counter:
    """For every query, how many streamed scores exceed each of its tracked scores (vectorised)."""

    def __init__(self, tracked_scores: list[np.ndarray]):
        nq = len(tracked_scores)
        self.width = max((t.size for t in tracked_scores), default=0)
        # rows padded with +inf: no score is above them, so they never count; sorted per row
        self.sorted = np.full((nq, self.width), np.inf, dtype=np.float32)
        self.order: list[np.ndarray] = []
        for q, t in enumerate(tracked_scores):
            o = np.argsort(t, kind="stable")
            self.order.append(o)
            self.sorted[q, :t.size] = t[o]
        self.above = np.zeros((nq, self.width + 1), dtype=np.int64)  # histogram of "#tracked below x"
        self.low = self.sorted[:, 0] if self.width else np.full(nq, np.inf, np.float32)

    def update(self, scores: np.ndarray) -> None:
        """``scores`` [nq, c] float32 of one distractor chunk."""
        if not self.width:
            return
        for q in range(scores.shape[0]):
            row = scores[q]
            row = row[row > self.low[q]]  # only scores above the lowest tracked one can count
            if row.size:
                below = np.searchsorted(self.sorted[q], row, side="left")  # tracked strictly below x
                self.above[q] += np.bincount(below, minlength=self.width + 1)

    def counts(self, q: int) -> np.ndarray:
        """Distractors strictly above each tracked score of query ``q`` (in the tracked order)."""
        n = self.order[q].size
        # tracked k (sorted) is exceeded by every x with more than k tracked below it
        tail = np.cumsum(self.above[q, ::-1])[::-1]  # tail[j] = sum(above[j:])
        exceed_sorted = tail[1:n + 1]
        out = np.empty(n, dtype=np.int64)
        out[self.order[q]] = exceed_sorted
        return out


def _as_float32(chunk: np.ndarray) -> np.ndarray:
    """float32 view/copy; float16 goes through torch, whose conversion is ~2x numpy's (exact either way)."""
    if chunk.dtype == np.float32:
        return chunk
    if chunk.dtype == np.float16:
        return torch.from_numpy(np.ascontiguousarray(chunk)).float().numpy()
    return chunk.astype(np.float32)


def streaming_positions(query_desc: np.ndarray, db_desc: np.ndarray, gnd: Sequence[dict],
                        distractor_chunks: Iterable[np.ndarray], *, progress: bool = False,
                        total: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Positions of each query's tracked images (easy ∪ hard ∪ junk, sorted) in the full ranking.

    Returns ``(tracked_indices, positions, n_distractors)``, one array per query."""
    q = np.ascontiguousarray(query_desc, dtype=np.float32)
    db = np.ascontiguousarray(db_desc, dtype=np.float32)
    if q.ndim != 2 or db.ndim != 2 or q.shape[1] != db.shape[1]:
        raise RankingError(f"query descriptors {q.shape} and database descriptors {db.shape} must be "
                           "[n, D] with the same D")
    if len(gnd) != q.shape[0]:
        raise RankingError(f"ground truth has {len(gnd)} queries but {q.shape[0]} query descriptors were given")
    tracked = _tracked_sets(gnd, db.shape[0])
    db_scores = q @ db.T  # [nq, n_db] float32: the same values a full ranking sorts
    db_pos = [_db_positions(db_scores[i], tracked[i]) for i in range(q.shape[0])]
    counter = _Counter([db_scores[i, t] for i, t in enumerate(tracked)])
    n_dis = 0
    bar = tqdm(total=total, desc="distractors", unit="img", disable=not progress)
    for chunk in distractor_chunks:
        chunk = np.asarray(chunk)
        if chunk.ndim != 2 or chunk.shape[1] != q.shape[1]:
            raise RankingError(f"distractor chunk has shape {chunk.shape}; expected [n, {q.shape[1]}]")
        counter.update(q @ _as_float32(chunk).T)
        n_dis += chunk.shape[0]
        bar.update(chunk.shape[0])
    bar.close()
    positions = [db_pos[i] + counter.counts(i) for i in range(q.shape[0])]
    return tracked, positions, n_dis


def evaluate_streaming(query_desc: np.ndarray, db_desc: np.ndarray, gnd: Sequence[dict],
                       distractor_chunks: Iterable[np.ndarray], kappas: Sequence[int] = DEFAULT_KAPPAS,
                       *, progress: bool = False, total: int | None = None) -> dict:
    """revisitop E/M/H over database + distractors, exactly as :func:`evaluate_ranks` on the full ranking.

    ``query_desc`` [n_q, D], ``db_desc`` [n_db, D] (the ground truth's database, in its order),
    ``distractor_chunks``: float arrays [c, D] in distractor order (they follow the database).
    Similarity is the float32 dot product. Returns ``{"easy"|"medium"|"hard": {"map", "mp@k", "aps"}}``
    (percent) plus ``"n_distractors"``.
    """
    tracked, positions, n_dis = streaming_positions(query_desc, db_desc, gnd, distractor_chunks,
                                                    progress=progress, total=total)
    out: dict[str, Any] = {}
    for p in PROTOCOLS:
        pos_all, ign_all = [], []
        for q, entry in enumerate(gnd):
            pos, ign = protocol_sets(entry, p)
            where = tracked[q]
            pos_all.append(positions[q][np.searchsorted(where, pos)])
            ign_all.append(positions[q][np.searchsorted(where, ign)])
        out[p] = evaluate_positions(pos_all, ign_all, kappas=kappas)
    out["n_distractors"] = n_dis
    log.info("evaluated %d queries over %d database images + %d distractors", len(gnd), len(db_desc), n_dis)
    return out


def store_chunks(store: Any, chunk_size: int = DEFAULT_CHUNK) -> Iterator[np.ndarray]:
    """float32 blocks of a FeatureStore's descriptors in row order (memory-mapped, bounded memory)."""
    for _, block in store.iter_descriptors(batch_size=chunk_size):
        yield block


def open_distractors(distractors: str | os.PathLike, *, distractors_root: str | os.PathLike | None = None,
                     model: Any = None, scales: Sequence[float] | None = None,
                     cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Any:
    """The FeatureStore of a distractor set: ``distractors`` is a store directory, or a list file
    (e.g. revisitop1m.txt) whose images under ``distractors_root`` are extracted with ``model`` into
    a cached store ``<cache>/distractors/<list name>/<preset>-<config hash>`` first (resumable).

    With a model, a given store must have been extracted with the same model config, so query,
    database and distractor descriptors are comparable (StoreError / ConfigError otherwise)."""
    path = Path(distractors)
    if path.is_dir():
        store = FeatureStore.open(path)
        if model is not None:
            want = config_hash(model_config(model, check_scales(scales, model), False))
            cfg = dict(store.meta.get("config", {}))
            cfg["rerank_maps"] = False
            if config_hash(cfg) != want:
                raise StoreError(f"distractor store {path} was extracted with another model/config "
                                 f"({store.meta.get('model')}) than {model.preset_name}; extract the "
                                 "distractors with the same model and scales")
        return store
    if not path.is_file():
        raise ConfigError(f"--distractors {path}: neither a feature store directory nor a list file")
    if distractors_root is None or model is None:
        raise ConfigError(f"--distractors {path} is a list file: give --distractors-root (the image folder) "
                          "and a model so the distractors can be extracted")
    dset = load_distractors(path, distractors_root)
    scales = check_scales(scales, model)
    tag = f"{model.preset_name}-{config_hash(model_config(model, scales, False))[:12]}"
    target = cache_root(cache_dir) / "distractors" / path.stem / tag
    items = [Item(i, str(p)) for i, p in zip(dset.ids, dset.paths)]
    store = extract_to_store(model, items, target, scales=scales, progress=progress,
                             optimize=not getattr(model, "is_onnx", False))
    store.close()
    return FeatureStore.open(target)


def evaluate_with_distractors(query_desc: np.ndarray, db_desc: np.ndarray, gnd: Sequence[dict],
                              distractors: str | os.PathLike, *,
                              distractors_root: str | os.PathLike | None = None, model: Any = None,
                              scales: Sequence[float] | None = None,
                              cache_dir: str | os.PathLike | None = None,
                              kappas: Sequence[int] = DEFAULT_KAPPAS, chunk_size: int = DEFAULT_CHUNK,
                              progress: bool = True) -> dict:
    """``irkit eval … --distractors LIST_OR_STORE [--distractors-root DIR]``: +N evaluation.

    Opens (or extracts, see :func:`open_distractors`) the distractor store and streams it through
    :func:`evaluate_streaming`. Distractors keep the store's row order (a list file's order when
    extracted here; images that failed to load are absent)."""
    store = open_distractors(distractors, distractors_root=distractors_root, model=model, scales=scales,
                             cache_dir=cache_dir, progress=progress)
    if store.dim != np.shape(query_desc)[1]:
        raise ConfigError(f"distractor store has {store.dim}-D descriptors, queries {np.shape(query_desc)[1]}-D")
    return evaluate_streaming(query_desc, db_desc, gnd, store_chunks(store, chunk_size), kappas,
                              progress=progress, total=len(store))

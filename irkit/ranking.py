"""The ranking file: the artifact between search (and re-ranking) and evaluation.

Why a file: each step of the flow reads and writes persisted artifacts (extract -> store,
index -> index file, search/rerank -> ranking, evaluate -> report), so a ranking computed once, by
any caller (``irkit search -o``, ``irkit eval -o``, the Python API), can be scored, compared or
re-ranked later without the model.

Format (``.npz``, no pickles): ``query_ids`` [nq] and ``db_ids`` [n_db] (str), ``rows`` [nq, k]
int64 indices into ``db_ids`` (-1 pads a query with fewer than k results), ``scores`` [nq, k]
float32 (final, best first), ``stages`` [nq, k] uint8 indices into ``stage_names`` saying which
step put each score there (``global``, ``qe``, ``cvnet``, ``spatial``), and ``meta`` (JSON text:
store, model, options). Rankings may be truncated (top-k); evaluation counts positives that are
not in the list as not retrieved.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from irkit.errors import RankingError
from irkit.utils import atomic_path

STAGES = ("global", "qe", "cvnet", "spatial")
FORMAT = "irkit-ranking"

log = logging.getLogger(__name__)


@dataclass
class Ranking:
    """Top-k results of a set of queries over one database (see the module docstring)."""

    query_ids: list[str]
    db_ids: list[str]
    rows: np.ndarray
    scores: np.ndarray
    stages: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rows = np.asarray(self.rows, dtype=np.int64)
        self.scores = np.asarray(self.scores, dtype=np.float32)
        self.stages = np.asarray(self.stages, dtype=np.uint8)
        nq = len(self.query_ids)
        if self.rows.ndim != 2 or self.rows.shape[0] != nq:
            raise RankingError(f"ranking rows must be [{nq} queries, k], got shape {self.rows.shape}")
        if self.scores.shape != self.rows.shape or self.stages.shape != self.rows.shape:
            raise RankingError(f"ranking scores {self.scores.shape} and stages {self.stages.shape} must have "
                               f"the shape of its rows {self.rows.shape}")
        if self.rows.size and (self.rows.min() < -1 or self.rows.max() >= len(self.db_ids)):
            raise RankingError(f"ranking rows must index its {len(self.db_ids)} database ids (or be -1 padding)")
        if self.stages.size and self.stages.max() >= len(STAGES):
            raise RankingError(f"ranking stages must be indices into {STAGES}")

    @classmethod
    def from_hits(cls, query_ids: Sequence[str], hits: Sequence[Sequence[dict]], meta: dict | None = None) -> "Ranking":
        """From per-query hit lists ``[{"id", "score", "stage"}, ...]`` (best first)."""
        db_ids: dict[str, int] = {}
        k = max((len(h) for h in hits), default=0)
        rows = np.full((len(hits), k), -1, np.int64)
        scores = np.full((len(hits), k), -np.inf, np.float32)
        stages = np.zeros((len(hits), k), np.uint8)
        for q, qhits in enumerate(hits):
            for j, hit in enumerate(qhits):
                rows[q, j] = db_ids.setdefault(hit["id"], len(db_ids))
                scores[q, j] = hit["score"]
                stages[q, j] = STAGES.index(hit.get("stage", "global"))
        return cls(list(query_ids), list(db_ids), rows, scores, stages, dict(meta or {}))

    @property
    def depth(self) -> int:
        return int(self.rows.shape[1])

    def hits(self, q: int) -> list[dict[str, Any]]:
        """Results of query ``q`` as ``{"id", "score", "stage"}`` dicts, best first."""
        return [{"id": self.db_ids[r], "score": float(s), "stage": STAGES[g]}
                for r, s, g in zip(self.rows[q], self.scores[q], self.stages[q]) if r >= 0]

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (a crash leaves the previous file or none); returns the path."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        with atomic_path(path, suffix=".tmp") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, format=np.array(FORMAT), query_ids=np.array(self.query_ids, dtype=str),
                         db_ids=np.array(self.db_ids, dtype=str), rows=self.rows, scores=self.scores,
                         stages=self.stages, stage_names=np.array(STAGES, dtype=str),
                         meta=np.array(json.dumps(self.meta, default=str)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Ranking":
        """Read a file written by :meth:`save`; RankingError naming what is wrong otherwise."""
        path = Path(path)
        if not path.exists():
            raise RankingError(f"no ranking file at {path}; write one with `irkit search ... -o {path}`")
        try:
            with np.load(path, allow_pickle=False) as z:
                if "format" not in z or str(z["format"]) != FORMAT:
                    raise RankingError(f"{path} is not an irkit ranking file (written by `irkit search -o`)")
                names = tuple(str(s) for s in z["stage_names"])
                if names != STAGES[:len(names)]:
                    raise RankingError(f"{path} uses stages {names}, this irkit knows {STAGES}")
                return cls([str(s) for s in z["query_ids"]], [str(s) for s in z["db_ids"]], z["rows"],
                           z["scores"], z["stages"], json.loads(str(z["meta"])))
        except (OSError, ValueError, KeyError) as exc:
            raise RankingError(f"cannot read ranking file {path}: {exc}") from exc

    def to_ranks(self, imlist: Sequence[str], qimlist: Sequence[str]) -> np.ndarray:
        """Positions into ``imlist`` for the queries of ``qimlist``, as ``[k, nq]`` (revisitop layout).

        Ids match image names exactly or without their extension (store ids of a folder have none);
        a query of ``qimlist`` missing from the ranking is an error, a database id unknown to
        ``imlist`` is dropped (the ranking stays in order), and every query is cut to the shortest
        resulting depth (revisitop rankings have one depth)."""
        def stem(name: str) -> str:
            base = name.rsplit("/", 1)[-1]
            return base.rsplit(".", 1)[0] if "." in base else base

        qpos = {}
        for i, name in enumerate(self.query_ids):
            qpos.setdefault(name, i)
            qpos.setdefault(stem(name), i)
        missing = [q for q in qimlist if q not in qpos and stem(q) not in qpos]
        if missing:
            raise RankingError(f"the ranking has no results for {len(missing)} quer(ies) of the ground truth, "
                               f"e.g. {missing[:3]}; its queries are e.g. {self.query_ids[:3]}")
        db_pos = {name: i for i, name in enumerate(imlist)}
        for i, name in enumerate(imlist):
            db_pos.setdefault(stem(name), i)
        lookup = np.array([db_pos.get(d, db_pos.get(stem(d), -1)) for d in self.db_ids] + [-1], np.int64)
        out = np.full((self.depth, len(qimlist)), -1, np.int64)
        for j, q in enumerate(qimlist):
            pos = lookup[self.rows[qpos.get(q, qpos.get(stem(q)))]]
            pos = pos[pos >= 0]
            out[:len(pos), j] = pos
        depth = int((out >= 0).sum(axis=0).min()) if out.size else 0
        if (out[depth:] >= 0).any():
            log.warning("queries have rankings of different depths over the ground truth's database; "
                        "evaluating the top %d of each", depth)
        return out[:depth]


__all__ = ["Ranking", "STAGES"]

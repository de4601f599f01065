"""End to end on a revisitop-layout dataset: extract (cached in feature stores), rank, optionally
expand queries and re-rank, evaluate. The CLI's `eval` and `test` commands are thin layers over it."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from irkit.data.revisitop import RevisitopDataset, load_revisitop
from irkit.errors import ConfigError
from irkit.extract import Item, check_scales, extract_to_store, model_config
from irkit.models.base import GlobalModel

log = logging.getLogger(__name__)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where dataset feature stores are cached: ``cache_dir``, $IRKIT_CACHE, or ~/.cache/irkit."""
    if cache_dir:
        return Path(cache_dir)
    return Path(os.environ.get("IRKIT_CACHE", Path.home() / ".cache" / "irkit"))


@dataclass
class QueryExpansion:
    """Test-time processing: ``method`` none | aqe | alpha; ``k`` neighbours; ``alpha`` exponent;
    ``dba`` neighbours for database-side augmentation (0 = off)."""

    method: str = "none"
    k: int = 2
    alpha: float = 3.0
    dba: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("none", "aqe", "alpha"):
            raise ConfigError(f"unknown query expansion {self.method!r}; use none, aqe or alpha")
        if self.k < 0 or self.dba < 0:
            raise ConfigError("query-expansion k and dba must be >= 0")


@dataclass
class DatasetRun:
    """Descriptors, scores, rankings and results of one model on one dataset."""

    dataset: RevisitopDataset
    queries: np.ndarray            # [nq, D]
    database: np.ndarray           # [n_db, D]
    scores: np.ndarray             # [nq, n_db] global similarity (after QE/DBA)
    ranks: np.ndarray              # [n_db, nq] revisitop convention
    results: dict[str, Any]
    scales: tuple[float, ...] = ()
    stores: dict[str, Any] = field(default_factory=dict)


def extract_dataset(ds: RevisitopDataset, model: GlobalModel, scales: Sequence[float] | None = None,
                    cache_dir: str | os.PathLike | None = None, with_maps: bool = False,
                    progress: bool = True) -> dict[str, Any]:
    """Feature stores of the database and the (bbx-cropped) queries, reused when cached."""
    from irkit.store import config_hash

    scales = check_scales(scales, model)
    tag = f"{model.preset_name}-{config_hash(model_config(model, scales, with_maps))[:12]}"
    base = cache_root(cache_dir) / "datasets" / ds.name / tag
    db_items = [Item(n, str(p)) for n, p in zip(ds.imlist, ds.db_paths)]
    q_items = [Item(n, str(p), b) for n, p, b in zip(ds.qimlist, ds.query_paths, ds.query_bbx)]
    return {
        "database": extract_to_store(model, db_items, base / "database", scales=scales,
                                     with_maps=with_maps, progress=progress),
        "queries": extract_to_store(model, q_items, base / "queries", scales=scales,
                                    with_maps=with_maps, progress=progress),
    }


def aligned_descriptors(store, ids: Sequence[str]) -> np.ndarray:
    """Rows of ``store`` in the order of ``ids``; images that failed to extract get a zero row
    (similarity 0 to everything), with a warning naming them."""
    desc = np.asarray(store.descriptors(), dtype=np.float32)
    out = np.zeros((len(ids), desc.shape[1]), np.float32)
    missing = []
    for i, name in enumerate(ids):
        if name in store:
            out[i] = desc[store.index_of(name)]
        else:
            missing.append(name)
    if missing:
        log.warning("%d images have no descriptor (failed to load), e.g. %s", len(missing), missing[:3])
    return out


def global_scores(queries: np.ndarray, database: np.ndarray, qe: QueryExpansion | None = None) -> np.ndarray:
    """[nq, n_db] dot-product similarities, after optional DBA and query expansion."""
    from irkit.search import qe as qe_mod

    qe = qe or QueryExpansion()
    if qe.dba:
        database = qe_mod.dba(database, qe.dba)
    if qe.method == "aqe" and qe.k:
        queries = qe_mod.aqe(queries, database, qe.k)
    elif qe.method == "alpha" and qe.k:
        queries = qe_mod.alpha_qe(queries, database, qe.k, qe.alpha)
    return queries @ database.T


def ranks_of(scores: np.ndarray) -> np.ndarray:
    """[nq, n_db] scores -> [n_db, nq] rankings (descending, ties by index)."""
    return np.argsort(-scores, axis=1, kind="stable").T.copy()


def evaluate_dataset(data_dir: str | os.PathLike, name: str, model: GlobalModel,
                     scales: Sequence[float] | None = None, qe: QueryExpansion | None = None,
                     cache_dir: str | os.PathLike | None = None, with_maps: bool = False,
                     progress: bool = True) -> DatasetRun:
    """Extract (or reuse) features, rank the database for every query, evaluate E/M/H."""
    from irkit.eval.revisitop import evaluate_ranks

    ds = load_revisitop(data_dir, name)
    scales = check_scales(scales, model)
    stores = extract_dataset(ds, model, scales, cache_dir, with_maps, progress)
    q = aligned_descriptors(stores["queries"], ds.qimlist)
    db = aligned_descriptors(stores["database"], ds.imlist)
    scores = global_scores(q, db, qe)
    ranks = ranks_of(scores)
    return DatasetRun(ds, q, db, scores, ranks, evaluate_ranks(ranks, ds.gnd), scales, stores)

"""End to end on a revisitop-layout dataset: extract (cached in feature stores), rank through the
one exact Index, optionally expand queries and re-rank, evaluate. The CLI's `eval`, `test` and
`demo` commands are thin layers over it."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from irkit.data.revisitop import RevisitopDataset, load_gnd, load_revisitop
from irkit.errors import ConfigError
from irkit.eval.revisitop import PROTOCOLS, evaluate_ranks
from irkit.extract import Item, check_scales, extract_to_store, model_config
from irkit.models.base import GlobalModel
from irkit.ranking import Ranking
from irkit.search import qe as qe_mod
from irkit.search.index import Index
from irkit.search.rerank import CVNetScorer, rerank
from irkit.search.spatial import FileSpatialScorer
from irkit.store import config_hash
from irkit.utils import cache_root

log = logging.getLogger(__name__)


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


def global_search(queries: np.ndarray, database: np.ndarray, qe: QueryExpansion | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Rank the whole database for every query through an exact :class:`~irkit.search.index.Index`
    (after optional DBA and query expansion, their neighbours found by the same index):
    (scores [nq, n_db] in database order, ranks [n_db, nq] revisitop convention)."""
    qe = qe or QueryExpansion()
    database = np.ascontiguousarray(database, dtype=np.float32)
    index = Index.build(database, "Flat", progress=False)
    if qe.dba:
        k = min(qe.dba, len(database) - 1)
        database = qe_mod.dba(database, qe.dba, neighbours=index.search(database, k + 1))
        index = Index.build(database, "Flat", progress=False)
    if qe.method != "none" and qe.k:
        neighbours = index.search(queries, min(qe.k, len(database)))
        queries = (qe_mod.aqe(queries, database, qe.k, neighbours=neighbours) if qe.method == "aqe"
                   else qe_mod.alpha_qe(queries, database, qe.k, qe.alpha, neighbours=neighbours))
    top, rows = index.search(queries, len(database))
    scores = np.empty((len(queries), len(database)), dtype=np.float32)
    np.put_along_axis(scores, rows, top, axis=1)
    return scores, rows.T.copy()


def evaluate_dataset(data_dir: str | os.PathLike, name: str, model: GlobalModel,
                     scales: Sequence[float] | None = None, qe: QueryExpansion | None = None,
                     cache_dir: str | os.PathLike | None = None, with_maps: bool = False,
                     progress: bool = True) -> DatasetRun:
    """Extract (or reuse) features, rank the database for every query, evaluate E/M/H."""
    ds = load_revisitop(data_dir, name)
    scales = check_scales(scales, model)
    stores = extract_dataset(ds, model, scales, cache_dir, with_maps, progress)
    q = aligned_descriptors(stores["queries"], ds.qimlist)
    db = aligned_descriptors(stores["database"], ds.imlist)
    scores, ranks = global_search(q, db, qe)
    return DatasetRun(ds, q, db, scores, ranks, evaluate_ranks(ranks, ds.gnd), scales, stores)


class StoreRows:
    """Re-rank maps of a store addressed by dataset row (store order may differ from the dataset's)."""

    def __init__(self, store, ids: Sequence[str]) -> None:
        self.store = store
        self.rows = [store.index_of(i) if i in store else -1 for i in ids]
        self.has_maps = store.has_maps

    def get_map(self, i: int) -> np.ndarray:
        row = self.rows[int(i)]
        if row < 0:
            raise ConfigError(f"image {i} of the dataset has no stored re-rank map (it failed to load)")
        return self.store.get_map(row)


def make_scorer(run: DatasetRun, model: GlobalModel, method: str):
    """A re-rank scorer for the dataset of ``run``; query handles are query indices."""
    ds = run.dataset
    if method == "cvnet":
        reranker = getattr(model, "reranker", None)
        if reranker is None:
            raise ConfigError(f"--rerank cvnet needs a model with a CVNet re-ranker (cvnet-r50, cvnet-r101), "
                              f"not {model.preset_name}")
        return CVNetScorer(reranker, StoreRows(run.stores["database"], ds.imlist),
                           StoreRows(run.stores["queries"], ds.qimlist))
    if method == "spatial":
        return FileSpatialScorer([str(p) for p in ds.query_paths], [str(p) for p in ds.db_paths],
                                 query_boxes=ds.query_bbx)
    raise ConfigError(f"unknown re-ranking method {method!r}; use cvnet or spatial")


def rerank_results(run: DatasetRun, model: GlobalModel, k: int = 100, mode: str = "plain",
                   method: str = "cvnet", lam: float = 0.5, progress: bool = True) -> tuple[dict[str, Any], np.ndarray]:
    """Re-rank the global top-``k`` of every query and evaluate: (results, rankings [n_db, n_q]).

    In ``protocol`` mode each protocol's numbers come from its own candidate list (images it
    ignores skipped, as CVNet/DELG did); the rankings returned are then the Medium protocol's."""
    out = rerank(run.scores, make_scorer(run, model, method), k=k, lam=lam, mode=mode,
                 gnd=run.dataset.gnd, ranks=run.ranks, progress=progress)
    if mode == "plain":
        return evaluate_ranks(out.ranks["plain"], run.dataset.gnd), out.ranks["plain"]
    return {p: evaluate_ranks(out.ranks[p], run.dataset.gnd)[p] for p in PROTOCOLS}, out.ranks["medium"]


def evaluate_ranking(ranking: Ranking | str | os.PathLike, gnd_path: str | os.PathLike,
                     kappas: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """The evaluate step on a ranking file (``irkit search -o``): its ids matched to the ground
    truth's names, truncated rankings scored as revisitop's compute_map does."""
    ranking = ranking if isinstance(ranking, Ranking) else Ranking.load(ranking)
    gnd = load_gnd(gnd_path)
    ranks = ranking.to_ranks(gnd["imlist"], gnd["qimlist"])
    return evaluate_ranks(ranks, gnd["gnd"], kappas=kappas, n_db=len(gnd["imlist"]))

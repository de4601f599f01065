"""The index step: build a store's index file, and open it for searching (the one way every caller
gets the index of a store: CLI, Python API, HTTP service and dataset evaluation)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from irkit.errors import StoreError
from irkit.search.index import Index, check_fresh, default_index_path, sidecar_path
from irkit.search.milvus_index import MilvusIndex, has_milvus_index, open_milvus_index
from irkit.search.qe import dba

if TYPE_CHECKING:  # pragma: no cover
    from irkit.store import FeatureStore

log = logging.getLogger(__name__)


def build_index(store: "FeatureStore", factory: str = "Flat", path: str | os.PathLike | None = None, *,
                train_size: int | None = None, nprobe: int | None = None, ef_search: int | None = None,
                dba_k: int = 0, dba_alpha: float | None = None, seed: int = 0) -> Index:
    """Build the id-mapped index of a store (optionally on DBA-augmented vectors) and save it.

    ``path`` defaults to ``STORE_DIR/index.faiss``; ``path=""`` skips saving.
    """
    if len(store) == 0:
        raise StoreError(f"store {store.root} is empty; extract features into it before indexing")
    index = Index.build(store, factory, train_size=train_size, seed=seed, nprobe=nprobe, ef_search=ef_search)
    if dba_k:
        db = store.descriptors()
        augmented = dba(db, int(dba_k), dba_alpha, neighbours=index.search(db, int(dba_k) + 1))
        index.faiss_index.reset()
        index._add_keyed(augmented, index._key_rows.keys)
        index.meta["dba"] = {"k": int(dba_k), "alpha": dba_alpha}
    index.meta["train_size"] = train_size
    if path is None:
        path = default_index_path(store)
    if path != "":
        index.save(path, store=store)
        index.meta["path"] = str(path)
    return index


def open_index(store: "FeatureStore", factory: str | None = None, path: str | os.PathLike | None = None,
               **build_kwargs: Any) -> Index | MilvusIndex:
    """The index of ``store``: the saved one (``STORE_DIR/index.faiss`` by default) when it belongs to
    this store, brought up to date incrementally if the store changed since; else built and saved.

    ``factory`` None takes whatever was saved (``Flat`` when nothing was); a different factory than
    the saved one rebuilds. Every caller (CLI, Python API, service, dataset evaluation) opens indexes
    here, so they all search the index the user built. A store indexed in Milvus (`irkit index
    --backend milvus`) opens its collection instead, synced with the store.
    """
    if factory is None and path is None and has_milvus_index(store):
        return open_milvus_index(store)
    if len(store) == 0:  # nothing to train on yet: an exact index keyed by id, filled by adds
        if factory not in (None, "Flat"):
            log.warning("store %s is empty: an exact (Flat) index instead of %r until `irkit index` has "
                        "vectors to train on", store.root, factory)
        index = Index(Index.create(store.dim, "Flat"), "Flat", key_mode="id")
        index.attach(store)
        return index
    path = Path(path) if path is not None else default_index_path(store)
    reason = ""
    if path.exists():
        try:
            index = Index.load(path, store=store, check_store=False)
            if factory is not None and index.factory != factory:
                reason = f"it is {index.factory!r} and {factory!r} was asked for"
            elif index.key_mode != "id":
                check_fresh(index.meta, store, path)
                return index
            elif index.meta.get("dba"):
                check_fresh(index.meta, store, path)
                return index
            else:
                added, removed = index.sync(store)
                if added or removed:
                    _save_quietly(index, path, store)
                return index
        except StoreError as exc:
            reason = str(exc)
        if index_meta_dba := _saved_dba(path):
            build_kwargs.setdefault("dba_k", index_meta_dba["k"])
            build_kwargs.setdefault("dba_alpha", index_meta_dba["alpha"])
    if reason:
        log.warning("rebuilding the index of %s: %s", store.root, reason)
    index = build_index(store, factory or "Flat", "", **build_kwargs)
    _save_quietly(index, path, store)
    return index


def _save_quietly(index: Index, path: Path, store: "FeatureStore") -> None:
    """Save, or keep the index in memory only when the store's folder is read-only (logged)."""
    try:
        index.save(path, store=store)
        index.meta["path"] = str(path)
    except OSError as exc:
        log.warning("cannot save the index to %s (%s); it lives in memory only", path, exc)


def _saved_dba(path: Path) -> dict | None:
    """The DBA settings recorded beside a saved index (kept when it has to be rebuilt)."""
    try:
        return json.loads(sidecar_path(path).read_text(encoding="utf-8")).get("dba")
    except (OSError, ValueError):
        return None


__all__ = ["build_index", "open_index"]

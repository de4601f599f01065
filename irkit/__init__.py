"""irkit: instance-level image retrieval (global descriptors, CVNet/CFCD, re-ranking, FAISS search,
revisitop evaluation).

Python API (imported lazily, so `import irkit` stays cheap)::

    import irkit
    model = irkit.build_model("effnetlite2-gem")              # or "cvnet-r50", weights="ckpt.pyth"
    store = irkit.extract("photos/", "store/", model=model)    # resumable feature store
    irkit.build_index(store, "IVF1024,PQ64")                   # optional: saved beside the store
    engine = irkit.SearchEngine.open("store/")                 # the store's index, QE, re-ranking
    hits = engine.search_file("query.jpg", k=10)
    engine.search_files(queries).save("ranking.npz")           # ranking file ...
    irkit.evaluate_ranking("ranking.npz", "gnd_roxford5k.pkl")  # ... scored with revisitop
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "build_model": ("irkit.models.registry", "build_model"),
    "list_presets": ("irkit.models.registry", "list_presets"),
    "FeatureStore": ("irkit.store", "FeatureStore"),
    "SearchEngine": ("irkit.search.engine", "SearchEngine"),
    "SearchOptions": ("irkit.search.engine", "SearchOptions"),
    "build_index": ("irkit.search.indexing", "build_index"),
    "open_index": ("irkit.search.indexing", "open_index"),
    "auto_build_index": ("irkit.search.autoindex", "auto_build_index"),
    "build_milvus_index": ("irkit.search.milvus_index", "build_milvus_index"),
    "Ranking": ("irkit.ranking", "Ranking"),
    "evaluate_ranking": ("irkit.pipeline", "evaluate_ranking"),
    "evaluate_dataset": ("irkit.pipeline", "evaluate_dataset"),
    "embed_files": ("irkit.extract", "embed_files"),
    "find_duplicates": ("irkit.search.dedup", "find_duplicates"),
}


def __getattr__(name: str) -> Any:
    if name == "extract":
        return importlib.import_module("irkit.extract")  # a callable module: irkit.extract(...)
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'irkit' has no attribute {name!r}")

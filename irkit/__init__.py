"""irkit: instance-level image retrieval (global descriptors, CVNet/CFCD, re-ranking, FAISS search,
revisitop evaluation).

Python API (imported lazily, so `import irkit` stays cheap)::

    import irkit
    model = irkit.build_model("effnetlite2-gem")              # or "cvnet-r50", weights="ckpt.pyth"
    store = irkit.extract("photos/", "store/", model=model)    # resumable feature store
    engine = irkit.SearchEngine.open("store/")                 # faiss index, QE, re-ranking
    hits = engine.search_file("query.jpg", k=10)
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
    "evaluate_dataset": ("irkit.pipeline", "evaluate_dataset"),
    "embed_files": ("irkit.extract", "embed_files"),
}


def __getattr__(name: str) -> Any:
    if name == "extract":
        return importlib.import_module("irkit.extract")  # a callable module: irkit.extract(...)
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'irkit' has no attribute {name!r}")

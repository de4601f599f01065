"""Search: faiss indexes over stored descriptors, query expansion / DBA, re-ranking."""
from irkit.search.index import Index, build_index, exact_search, load_or_build
from irkit.search.qe import alpha_qe, aqe, dba

__all__ = ["Index", "build_index", "load_or_build", "exact_search", "aqe", "alpha_qe", "dba"]

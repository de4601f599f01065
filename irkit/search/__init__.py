"""Search: faiss indexes over stored descriptors, query expansion / DBA, re-ranking."""
from irkit.search.index import Index
from irkit.search.indexing import build_index, open_index
from irkit.search.qe import alpha_qe, aqe, dba

__all__ = ["Index", "build_index", "open_index", "aqe", "alpha_qe", "dba"]

"""`irkit index STORE_DIR`: build and save the faiss index of a feature store."""
from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("index", help="build the search index of a feature store",
                              description="Build a faiss inner-product index over a store's descriptors "
                                          "and save it (with a JSON sidecar) beside the store.")
    p.add_argument("store", metavar="STORE_DIR", help="feature store directory (from `irkit extract`)")
    p.add_argument("--factory", default="Flat",
                   help="faiss factory string: Flat (exact, default), HNSW32, IVF1024,Flat, IVF4096,PQ64, ...")
    p.add_argument("--train-size", type=int, default=None,
                   help="vectors sampled to train IVF/PQ indexes (default: 64 per IVF list, at least 65536)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists probed per query (saved with the index)")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW efSearch (saved with the index)")
    p.add_argument("--dba", type=int, default=0, metavar="K",
                   help="database-side augmentation with the top-K neighbours before indexing (0 = off)")
    p.add_argument("--dba-alpha", type=float, default=None,
                   help="DBA weights sim^alpha instead of the default linear decay")
    p.add_argument("--seed", type=int, default=0, help="seed of the training sample")
    p.add_argument("-o", "--output", default=None, metavar="PATH",
                   help="index file (default STORE_DIR/index.faiss; sidecar PATH.json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from irkit.search.index import default_index_path
    from irkit.search.indexing import build_index
    from irkit.store import FeatureStore

    store = FeatureStore.open(args.store)
    path = args.output or default_index_path(store)
    index = build_index(store, args.factory, path, train_size=args.train_size, nprobe=args.nprobe,
                        ef_search=args.ef_search, dba_k=args.dba, dba_alpha=args.dba_alpha, seed=args.seed)
    log.info("index %s: %s, %d vectors of dim %d", path, index.factory, index.ntotal, index.dim)
    return 0

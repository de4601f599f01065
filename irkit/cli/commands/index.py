"""`irkit index STORE_DIR`: build and save the index of a feature store (faiss, chosen by hand or
automatically under a memory budget, or a Milvus collection)."""
from __future__ import annotations

import argparse
import logging

from irkit.errors import ConfigError

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("index", help="build the search index of a feature store",
                              description="Build a faiss inner-product index over a store's descriptors "
                                          "and save it (with a JSON sidecar) beside the store; or choose it "
                                          "automatically under a memory budget (--max-memory); or put the "
                                          "vectors into a Milvus collection (--backend milvus).")
    p.add_argument("store", metavar="STORE_DIR", help="feature store directory (from `irkit extract`)")
    p.add_argument("--factory", default=None,
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
    auto = p.add_argument_group("automatic choice (irkit.search.autoindex)")
    auto.add_argument("--max-memory", default=None, metavar="SIZE",
                      help="choose family and parameters (flat / IVF-Flat / HNSW / IVF-PQ, nlist, PQ bytes, "
                           "nprobe, re-score depth) to fit SIZE, e.g. 2GiB, 512MB")
    auto.add_argument("--max-query-ms", type=float, default=None, help="latency budget per query (ms)")
    auto.add_argument("--target-recall", type=float, default=0.95,
                      help="recall@k against exact search to reach (default 0.95)")
    auto.add_argument("--recall-k", type=int, default=10, help="k of the recall measurement (default 10)")
    auto.add_argument("--queries", type=int, default=200, help="held-out queries drawn from the store")
    auto.add_argument("--families", default=None,
                      help="comma-separated families to consider: flat,ivf-flat,hnsw,ivf-pq (default all)")
    mil = p.add_argument_group("Milvus backend (pip install 'irkit[milvus]')")
    mil.add_argument("--backend", choices=["faiss", "milvus"], default="faiss")
    mil.add_argument("--uri", default=None,
                     help="Milvus server (http://host:19530) or Milvus Lite file (default STORE_DIR/milvus.db)")
    mil.add_argument("--collection", default=None, help="collection name (default: derived from the store)")
    mil.add_argument("--milvus-index", default="FLAT",
                     help="Milvus index type: FLAT (exact), HNSW, IVF_FLAT, IVF_PQ, ... (default FLAT)")
    mil.add_argument("--token", default=None, help="Milvus token (user:password or API key)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from irkit.store import FeatureStore

    store = FeatureStore.open(args.store)
    if args.backend == "milvus":
        return _run_milvus(args, store)
    if args.uri or args.collection:
        raise ConfigError("--uri and --collection apply to --backend milvus")
    if args.max_memory is not None:
        return _run_auto(args, store)
    if args.max_query_ms is not None:
        raise ConfigError("--max-query-ms applies to the automatic choice: give --max-memory too")
    from irkit.search.index import default_index_path
    from irkit.search.indexing import build_index

    path = args.output or default_index_path(store)
    index = build_index(store, args.factory or "Flat", path, train_size=args.train_size, nprobe=args.nprobe,
                        ef_search=args.ef_search, dba_k=args.dba, dba_alpha=args.dba_alpha, seed=args.seed)
    log.info("index %s: %s, %d vectors of dim %d", path, index.factory, index.ntotal, index.dim)
    return 0


def _run_auto(args: argparse.Namespace, store) -> int:
    from irkit.search.autoindex import auto_build_index

    clash = [f for f, v in (("--factory", args.factory), ("--nprobe", args.nprobe), ("--ef-search", args.ef_search),
                            ("--dba", args.dba or None)) if v is not None]
    if clash:
        raise ConfigError(f"--max-memory chooses the index itself; drop {', '.join(clash)}")
    result = auto_build_index(store, args.max_memory, args.output, max_query_ms=args.max_query_ms,
                              target_recall=args.target_recall, k=args.recall_k, n_queries=args.queries,
                              families=tuple(f.strip() for f in args.families.split(",")) if args.families else None,
                              seed=args.seed)
    print(result.summary())
    if not result.choice["met_target"] or not result.choice["met_latency"]:
        print("note: no setting within the budget reached the target recall and latency; this is the best found")
    return 0


def _run_milvus(args: argparse.Namespace, store) -> int:
    from irkit.search.milvus_index import build_milvus_index

    if args.max_memory is not None or args.factory is not None:
        raise ConfigError("--max-memory and --factory choose a faiss index; with --backend milvus use --milvus-index")
    index = build_milvus_index(store, uri=args.uri, collection=args.collection, index_type=args.milvus_index,
                               token=args.token)
    d = index.describe()
    print(f"milvus collection {d['collection']} at {d['uri']}: {d['ntotal']} vectors of dim {d['dim']}, "
          f"index {d['index_type']}, metric IP")
    return 0

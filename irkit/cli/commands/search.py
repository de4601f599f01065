"""`irkit search IMAGE… --store DIR`: rank a feature store's images for query images."""
from __future__ import annotations

import argparse
import json

from irkit.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="search a feature store with query images",
                       description="Embed the query images with the store's model, search its index "
                       "(built and saved on first use), optionally expand queries and re-rank.")
    p.add_argument("images", nargs="+", help="query image files")
    p.add_argument("--store", required=True, help="feature store directory (from `irkit extract`)")
    p.add_argument("--k", type=int, default=100, help="results per query (default 100)")
    p.add_argument("--weights", help="weights of the store's model preset (must be those the store was built with)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--factory", default="Flat", help="faiss index factory (default Flat = exact)")
    p.add_argument("--rescore", type=int, default=0, metavar="N",
                   help="re-score the approximate index's top N exactly from the store (default 0 = off)")
    p.add_argument("--qe", choices=["none", "aqe", "alpha"], default="none", help="query expansion")
    p.add_argument("--qe-k", type=int, default=2)
    p.add_argument("--qe-alpha", type=float, default=3.0)
    p.add_argument("--rerank", choices=["none", "cvnet", "spatial"], default="none")
    p.add_argument("--topk", type=int, default=100, help="candidates to re-rank (default 100)")
    p.add_argument("--lambda", dest="lam", type=float, default=0.5, help="final = global + lambda * rerank")
    p.add_argument("--json", action="store_true", help="print [{query, results: [{id, path, score}]}]")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from irkit.search.engine import SearchEngine

    if args.k <= 0:
        raise ConfigError(f"--k must be positive, got {args.k}")
    if args.rescore < 0:
        raise ConfigError(f"--rescore must be >= 0, got {args.rescore}")
    engine = SearchEngine.open(args.store, weights=args.weights, device=args.device, factory=args.factory)
    out = []
    for path in args.images:
        hits = engine.search_file(path, k=args.k, qe=args.qe, qe_k=args.qe_k, qe_alpha=args.qe_alpha,
                                  rerank=args.rerank, topk=args.topk, lam=args.lam, rescore=args.rescore)
        out.append({"query": path, "results": hits})
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    for entry in out:
        print(f"query {entry['query']}" + (f" (re-ranked: {args.rerank}, top {args.topk})" if args.rerank != "none" else ""))
        for rank, hit in enumerate(entry["results"][:args.k], 1):
            print(f"  {rank:4d}  {hit['score']:.4f}  {hit['id']}  {hit['path']}")
    return 0

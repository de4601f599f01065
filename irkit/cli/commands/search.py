"""`irkit search IMAGE… --store DIR`: rank a feature store's images for query images."""
from __future__ import annotations

import argparse
import json

from irkit.errors import ConfigError
from irkit.search.engine import QE_METHODS, RERANK_METHODS, SearchEngine, SearchOptions

_DEFAULTS = SearchOptions()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="search a feature store with query images",
                       description="Embed the query images with the store's model, search the store's index "
                       "(the one `irkit index` saved; exact when there is none), optionally expand queries and "
                       "re-rank. -o writes a ranking file that `irkit eval --ranking` scores.")
    p.add_argument("images", nargs="+", help="query image files (query id = file name without extension)")
    p.add_argument("--store", required=True, help="feature store directory (from `irkit extract`)")
    p.add_argument("--k", type=int, default=_DEFAULTS.k, help=f"results per query (default {_DEFAULTS.k})")
    p.add_argument("--weights", help="weights of the store's model preset (must be those the store was built with)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--factory", default=None,
                   help="faiss index factory (default: the index saved with the store, else Flat = exact)")
    p.add_argument("--rescore", type=int, default=None, metavar="N",
                   help="re-score the approximate index's top N exactly from the store (default: the depth "
                        "saved by `irkit index --max-memory`, else 0 = off)")
    p.add_argument("--box", type=float, nargs=4, metavar=("X1", "Y1", "X2", "Y2"),
                   help="crop every query to this box (pixels) before embedding")
    p.add_argument("--qe", choices=QE_METHODS, default=_DEFAULTS.qe, help="query expansion")
    p.add_argument("--qe-k", type=int, default=_DEFAULTS.qe_k)
    p.add_argument("--qe-alpha", type=float, default=_DEFAULTS.qe_alpha)
    p.add_argument("--rerank", choices=RERANK_METHODS, default=_DEFAULTS.rerank)
    p.add_argument("--topk", type=int, default=_DEFAULTS.topk, help=f"candidates to re-rank (default {_DEFAULTS.topk})")
    p.add_argument("--lambda", dest="lam", type=float, default=_DEFAULTS.lam, help="final = global + lambda * rerank")
    p.add_argument("-o", "--output", metavar="RANKING", help="write the ranking file (.npz) for `irkit eval --ranking`")
    p.add_argument("--json", action="store_true", help="print [{query, results: [{id, path, score, global, stage}]}]")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.k <= 0:
        raise ConfigError(f"--k must be positive, got {args.k}")
    opts = SearchOptions(k=args.k, qe=args.qe, qe_k=args.qe_k, qe_alpha=args.qe_alpha, rerank=args.rerank,
                         topk=args.topk, lam=args.lam, rescore=args.rescore)
    engine = SearchEngine.open(args.store, weights=args.weights, device=args.device, factory=args.factory)
    ranking = engine.search_files(args.images, opts, boxes=[args.box] * len(args.images))
    if args.output:
        path = ranking.save(args.output)
        print(f"ranking of {len(args.images)} quer(ies), top {ranking.depth}: {path}")
    paths = dict(zip(engine.store.ids, engine.store.paths))
    out = [{"query": q, "results": [{**h, "path": paths.get(h["id"])} for h in ranking.hits(i)]}
           for i, q in enumerate(args.images)]
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    for entry in out:
        print(f"query {entry['query']}" + (f" (re-ranked: {args.rerank}, top {args.topk})" if args.rerank != "none" else ""))
        for rank, hit in enumerate(entry["results"], 1):
            print(f"  {rank:4d}  {hit['score']:.4f}  {hit['id']}  {hit['path']}")
    return 0

"""`irkit eval`: score rankings with the revisitop protocol.

Mode "precomputed" (``--gnd``): rankings (full, or each query's top-k) or scores from any tool,
saved as .npy; the database size is the ground truth's (plus ``--n-distractors``).
Mode "dataset" (``--dataset NAME --data-dir DIR``): extract with a model preset (cached feature
stores), rank, optionally expand queries and re-rank, evaluate.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np

from irkit.cli.common import add_model_args, model_from_args
from irkit.data.revisitop import load_gnd
from irkit.errors import ConfigError, RankingError
from irkit.eval.revisitop import PROTOCOLS, evaluate_ranks, format_table, ranks_from_scores
from irkit.pipeline import QueryExpansion, evaluate_dataset, evaluate_ranking, rerank_results
from irkit.train.select import load_rerank_choice

log = logging.getLogger(__name__)

KAPPAS = (1, 5, 10)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate rankings on a revisitop dataset (mAP, mP@k)",
                              description="Evaluate with the revisitop protocol (Easy/Medium/Hard).")
    pre = p.add_argument_group("precomputed rankings")
    pre.add_argument("--gnd", type=Path, help="revisitop ground truth gnd_<name>.pkl")
    src = pre.add_mutually_exclusive_group()
    src.add_argument("--ranks", type=Path, help=".npy of 0-based database indices [depth, n_queries], best first: "
                     "a full ranking or each query's top-k (positives beyond the depth count as not retrieved)")
    src.add_argument("--ranking", type=Path, help="an irkit ranking file (.npz, from `irkit search -o`); its ids "
                     "are matched to the ground truth's image names (with --gnd, or --dataset/--data-dir)")
    src.add_argument("--scores", type=Path, help=".npy of similarities [n_db, n_queries] (higher = better)")
    pre.add_argument("--query-major", action="store_true",
                     help="the .npy is [n_queries, depth] instead of [depth, n_queries]")
    pre.add_argument("--n-distractors", type=int, default=None,
                     help="the ranking also addresses this many distractors, numbered after the database "
                          "(+1M); default: 0, or the rows beyond the database of a full ranking")
    ds = p.add_argument_group("dataset (extract, rank, evaluate)")
    ds.add_argument("--dataset", help="revisitop-layout dataset name, e.g. roxford5k or minidev")
    ds.add_argument("--data-dir", type=Path, help="folder holding <dataset>/gnd_<dataset>.pkl and jpg/")
    ds.add_argument("--cache-dir", type=Path, help="feature-store cache (default $IRKIT_CACHE or ~/.cache/irkit)")
    ds.add_argument("--qe", choices=["none", "aqe", "alpha"], default="none", help="query expansion")
    ds.add_argument("--qe-k", type=int, default=2, help="neighbours for query expansion (default 2)")
    ds.add_argument("--qe-alpha", type=float, default=3.0, help="alpha of alpha-QE (default 3)")
    ds.add_argument("--dba", type=int, default=0, help="database-side augmentation neighbours (0 = off)")
    ds.add_argument("--rerank", choices=["none", "cvnet", "spatial"], default="none",
                    help="re-rank the global top-k (cvnet needs a cvnet-* model)")
    ds.add_argument("--topk", type=int, default=None, help="candidates to re-rank (default: rerank.json beside "
                    "the --weights of a trained re-ranker, else 100)")
    ds.add_argument("--rerank-mode", choices=["plain", "protocol"], default="plain",
                    help="plain: the global top-k; protocol: skip images each protocol ignores (as CVNet/DELG)")
    ds.add_argument("--lambda", dest="lam", type=float, default=None,
                    help="final score = global + lambda * rerank (default: rerank.json beside the --weights of a "
                    "trained re-ranker, chosen on its validation classes, else 0.5)")
    ds.add_argument("--distractors", type=Path, help="+1M: a distractor feature store, or a revisitop1m list "
                    "file (extracted into the cache first, needs --distractors-root); streamed, exact")
    ds.add_argument("--distractors-root", type=Path, help="image root of the --distractors list file")
    ds.add_argument("--report", type=Path, help="write an HTML report (table, AP bars, PR curves, top-10)")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print {easy|medium|hard: {map, mp@1, mp@5, mp@10}} in percent")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Dispatch on the mode: ``--gnd`` -> precomputed rankings."""
    if getattr(args, "ranking", None) is not None and args.gnd is None:
        if not (args.dataset and args.data_dir):
            raise ConfigError("--ranking needs the ground truth: --gnd GND.pkl, or --dataset NAME --data-dir DIR")
        args.gnd = Path(args.data_dir) / args.dataset / f"gnd_{args.dataset}.pkl"
    if getattr(args, "gnd", None) is not None:
        return run_precomputed(args)
    if getattr(args, "dataset", None):
        return run_dataset(args)
    raise ConfigError("nothing to evaluate: give --gnd GND.pkl with --ranks R.npy or --scores S.npy "
                      "(or --dataset NAME to extract and evaluate)")


def _load_npy(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise ConfigError(f"--{what} file {path} not found")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:  # corrupt or not an .npy
        raise RankingError(f"--{what} {path}: cannot be read as a .npy array ({exc})") from exc
    if not isinstance(arr, np.ndarray):
        raise RankingError(f"--{what} {path}: expected a single array (.npy), got {type(arr).__name__}")
    return arr


def results_json(results: dict) -> dict:
    """The JSON view: percentages per protocol, NaN as null, no per-query APs."""
    out = {}
    for p in PROTOCOLS:
        r = results[p]
        out[p] = {key: (None if math.isnan(r[key]) else r[key])
                  for key in ["map"] + [f"mp@{k}" for k in KAPPAS]}
    return out


def run_precomputed(args: argparse.Namespace) -> int:
    """Evaluate a saved ranking (or score matrix) against a gnd pickle."""
    if args.ranks is None and args.scores is None and args.ranking is None:
        raise ConfigError("--gnd needs --ranking RANKING.npz, --ranks RANKS.npy or --scores SCORES.npy")
    if args.ranking is not None:
        return _print_results(args, evaluate_ranking(args.ranking, args.gnd, KAPPAS))
    gnd = load_gnd(args.gnd)
    what = "ranks" if args.ranks is not None else "scores"
    arr = _load_npy(args.ranks if args.ranks is not None else args.scores, what)
    if arr.ndim != 2:
        raise RankingError(f"--{what} must be a 2-D array, got shape {arr.shape}")
    if args.query_major:
        arr = arr.T
    ranks = arr if what == "ranks" else ranks_from_scores(arr)
    n_gt = len(gnd["imlist"])                            # the database size comes from the ground truth
    if what == "scores" and ranks.shape[0] < n_gt:
        raise RankingError(f"--scores has {ranks.shape[0]} database rows but {args.gnd} has {n_gt} database "
                           f"images (shape {arr.shape}{'' if args.query_major else '; query-major? pass --query-major'})")
    if args.n_distractors is not None:
        if args.n_distractors < 0:
            raise ConfigError(f"--n-distractors must be >= 0, got {args.n_distractors}")
        n_db = n_gt + args.n_distractors
    else:
        n_db = max(n_gt, ranks.shape[0])
        if ranks.shape[0] > n_gt and ranks.shape[1] == len(gnd["qimlist"]):
            log.info("%d rows beyond the %d database images are treated as distractors", ranks.shape[0] - n_gt, n_gt)
    if what == "ranks" and ranks.shape[0] < n_db:
        log.info("top-%d rankings of a %d-image database: positives beyond them count as not retrieved",
                 ranks.shape[0], n_db)
    return _print_results(args, evaluate_ranks(ranks, gnd["gnd"], kappas=KAPPAS, n_db=n_db))


def _print_results(args: argparse.Namespace, results: dict) -> int:
    if args.json:
        print(json.dumps(results_json(results)))
    else:
        print(format_table(results, KAPPAS))
    return 0


def run_dataset(args: argparse.Namespace) -> int:
    """Extract (cached), rank, optionally QE and re-rank, evaluate; print the table or JSON."""
    if not args.data_dir:
        raise ConfigError("--dataset needs --data-dir (the folder holding <dataset>/)")
    if args.distractors and (args.rerank != "none" or args.qe != "none" or args.dba or args.report):
        raise ConfigError("--distractors (streamed +1M evaluation) works with global descriptors only: "
                          "drop --rerank/--qe/--dba/--report")
    qe = QueryExpansion(args.qe, args.qe_k, args.qe_alpha, args.dba)
    model = model_from_args(args)
    run_ = evaluate_dataset(args.data_dir, args.dataset, model, args.scales, qe=qe, cache_dir=args.cache_dir,
                            with_maps=args.rerank == "cvnet", progress=not args.json)
    results, ranks, label = run_.results, run_.ranks, "global"
    if args.distractors:
        from irkit.eval.streaming import evaluate_with_distractors

        results = evaluate_with_distractors(run_.queries, run_.database, run_.dataset.gnd, args.distractors,
                                            distractors_root=args.distractors_root, model=model,
                                            scales=run_.scales, cache_dir=args.cache_dir, progress=not args.json)
        label = f"global, +{results.get('n_distractors', '?')} distractors"
    if args.rerank != "none":
        choice = load_rerank_choice(args.weights) if args.rerank == "cvnet" else None
        lam = args.lam if args.lam is not None else (choice["lambda"] if choice else 0.5)
        topk = args.topk if args.topk is not None else (choice["topk"] if choice else 100)
        results, ranks = rerank_results(run_, model, topk, mode=args.rerank_mode, method=args.rerank, lam=lam)
        label = (f"re-ranked ({args.rerank}, top {topk}, {args.rerank_mode} candidates, lambda {lam}"
                 + (", from rerank.json)" if choice and (args.lam is None or args.topk is None) else ")"))
    if args.report:
        from irkit.eval.report import write_report

        write_report(results, ranks, run_.dataset.gnd, run_.dataset, args.report, title=f"{args.dataset} · {model.preset_name} · {label}")
    if args.json:
        print(json.dumps(results_json(results)))
    else:
        print(f"{args.dataset} · {model.preset_name} · scales {list(run_.scales)} · {label}")
        print(format_table(results, KAPPAS))
    return 0

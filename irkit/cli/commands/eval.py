"""`irkit eval`: score rankings with the revisitop protocol.

Mode "precomputed" (``--gnd``): rankings or scores from any tool, saved as .npy.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np

from irkit.data.revisitop import load_gnd
from irkit.errors import ConfigError, RankingError
from irkit.eval.revisitop import PROTOCOLS, evaluate_ranks, format_table, ranks_from_scores

log = logging.getLogger(__name__)

KAPPAS = (1, 5, 10)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate rankings on a revisitop dataset (mAP, mP@k)",
                              description="Evaluate with the revisitop protocol (Easy/Medium/Hard).")
    pre = p.add_argument_group("precomputed rankings")
    pre.add_argument("--gnd", type=Path, help="revisitop ground truth gnd_<name>.pkl")
    src = pre.add_mutually_exclusive_group()
    src.add_argument("--ranks", type=Path, help=".npy of 0-based database indices [n_db, n_queries]")
    src.add_argument("--scores", type=Path, help=".npy of similarities [n_db, n_queries] (higher = better)")
    pre.add_argument("--query-major", action="store_true",
                     help="the .npy is [n_queries, n_db] instead of [n_db, n_queries]")
    p.add_argument("--json", action="store_true", help="print {easy|medium|hard: {map, mp@1, mp@5, mp@10}} in percent")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Dispatch on the mode: ``--gnd`` -> precomputed rankings."""
    if getattr(args, "gnd", None) is not None:
        return run_precomputed(args)
    # other modes (e.g. --dataset NAME --data-dir DIR --model PRESET) dispatch here
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
    if args.ranks is None and args.scores is None:
        raise ConfigError("--gnd needs --ranks RANKS.npy or --scores SCORES.npy")
    gnd = load_gnd(args.gnd)
    what = "ranks" if args.ranks is not None else "scores"
    arr = _load_npy(args.ranks if args.ranks is not None else args.scores, what)
    if arr.ndim != 2:
        raise RankingError(f"--{what} must be a 2-D array, got shape {arr.shape}")
    if args.query_major:
        arr = arr.T
    ranks = arr if what == "ranks" else ranks_from_scores(arr)
    n_db = len(gnd["imlist"])
    if ranks.shape[0] < n_db:
        raise RankingError(f"--{what} has {ranks.shape[0]} database rows but {args.gnd} has {n_db} database "
                           f"images (shape {arr.shape}{'' if args.query_major else '; query-major? pass --query-major'})")
    if ranks.shape[0] > n_db and ranks.shape[1] == len(gnd["qimlist"]):
        log.info("%d rows beyond the %d database images are treated as distractors", ranks.shape[0] - n_db, n_db)
    results = evaluate_ranks(ranks, gnd["gnd"], kappas=KAPPAS)
    if args.json:
        print(json.dumps(results_json(results)))
    else:
        print(format_table(results, KAPPAS))
    return 0

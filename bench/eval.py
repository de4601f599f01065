"""Benchmark: revisitop evaluation of 70 queries over a 1M-image database (ROxf + 1M distractors).

    python bench/eval.py [--n-db 1000000] [--ref-queries 10]

Uses the real ROxf ground truth when ../shared/assets is present (else a synthetic one of the same
shape), appends distractor rows up to ``--n-db``, and builds rankings that put positives near the
top. The reference, measured in the same run, is the straightforward per-query approach of the
original evaluator: ``np.isin`` of the ranking against the positive and ignored lists, plus a Python loop removing ignored images; it runs on ``--ref-queries`` queries and is
extrapolated to all of them. A plain Python walk over one query's full ranking (the 70M-step
loop a naive port does) is timed too. All must agree on the queries they cover.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from irkit.eval.revisitop import PROTOCOLS, evaluate_ranks, protocol_sets  # noqa: E402

GND = ROOT.parent / "shared" / "assets" / "revisitop_gnd" / "roxford5k" / "gnd_roxford5k.pkl"


def load_or_make_gnd(rng: np.random.Generator) -> tuple[list[dict], int, str]:
    if GND.is_file():
        from irkit.data.revisitop import load_gnd
        g = load_gnd(GND)
        return g["gnd"], len(g["imlist"]), "real ROxf gnd"
    n = 4993
    gnd = []
    for _ in range(70):
        idx = rng.choice(n, 250, replace=False)
        gnd.append({"bbx": None, "easy": idx[:40].tolist(), "hard": idx[40:110].tolist(), "junk": idx[110:].tolist()})
    return gnd, n, "synthetic gnd (ROxf-like sizes)"


def make_ranks(gnd: list[dict], n_db: int, rng: np.random.Generator) -> np.ndarray:
    ranks = np.empty((n_db, len(gnd)), dtype=np.int32)
    for q, e in enumerate(gnd):
        col = rng.permutation(n_db).astype(np.int32)
        rel = np.array(e["easy"] + e["hard"] + e["junk"], dtype=np.int32)
        rng.shuffle(rel)
        # mix the relevant images with as many others at the top of the ranking, in random order
        mask = np.isin(col, rel)
        rest = col[~mask]
        head = np.concatenate([rel, rest[:rel.size]])
        rng.shuffle(head)
        ranks[:, q] = np.concatenate([head, rest[rel.size:]])
    return ranks


def reference_query(col: np.ndarray, pos_set: np.ndarray, ign_set: np.ndarray, kappas=(1, 5, 10)):
    """The per-query isin approach with a Python loop over positives and ignored positions."""
    pos = np.flatnonzero(np.isin(col, pos_set))
    ign = np.flatnonzero(np.isin(col, ign_set))
    adj = pos.copy()
    k = ij = 0
    for ip in range(len(pos)):
        while ij < len(ign) and pos[ip] > ign[ij]:
            k += 1
            ij += 1
        adj[ip] = pos[ip] - k
    ap = 0.0
    for j, r in enumerate(adj):
        ap += ((1.0 if r == 0 else j / r) + (j + 1) / (r + 1)) / 2 / len(pos_set)
    one = adj + 1
    prs = [np.count_nonzero(one <= min(one.max(), kk)) / min(one.max(), kk) for kk in kappas]
    return ap, prs


def brute_query(col: list[int], pos_set: set[int], ign_set: set[int]) -> float:
    """Plain Python walk over the whole ranking (what a naive port of the protocol does)."""
    ap, kept, found = 0.0, 0, 0
    for idx in col:
        if idx in ign_set:
            continue
        if idx in pos_set:
            ap += ((1.0 if kept == 0 else found / kept) + (found + 1) / (kept + 1)) / 2 / len(pos_set)
            found += 1
        kept += 1
    return ap


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-db", type=int, default=1_000_000)
    ap.add_argument("--ref-queries", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    gnd, n_gnd_db, source = load_or_make_gnd(rng)
    n_db = max(args.n_db, n_gnd_db)
    t0 = time.perf_counter()
    ranks = make_ranks(gnd, n_db, rng)
    print(f"{source}: {len(gnd)} queries x {n_db:,} database rows "
          f"({n_db - n_gnd_db:,} distractors); rankings built in {time.perf_counter() - t0:.1f}s")

    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        res = evaluate_ranks(ranks, gnd)
        times.append(time.perf_counter() - t0)
    ours = min(times)
    print(f"irkit evaluate_ranks (validation + 3 protocols): {ours:.3f}s "
          f"(best of {args.repeats}; all {', '.join(f'{t:.3f}' for t in times)})")
    print("  mAP E/M/H: " + " / ".join(f"{res[p]['map']:.2f}" for p in PROTOCOLS))

    nref = min(args.ref_queries, len(gnd))
    t0 = time.perf_counter()
    worst = 0.0
    for q in range(nref):
        for p in PROTOCOLS:
            pos, ign = protocol_sets(gnd[q], p)
            if pos.size == 0:
                continue
            ref_ap, _ = reference_query(ranks[:, q], pos, ign)
            worst = max(worst, abs(ref_ap * 100 - res[p]["aps"][q]))
    ref = (time.perf_counter() - t0) * len(gnd) / nref
    print(f"reference per-query isin + loop: {ref:.2f}s extrapolated from {nref} queries "
          f"(max |AP difference| {worst:.2e} percentage points)")
    print(f"speed-up vs reference: {ref / ours:.1f}x")

    col = ranks[:, 0].tolist()
    t0 = time.perf_counter()
    for p in PROTOCOLS:
        pos, ign = protocol_sets(gnd[0], p)
        if pos.size:
            b = brute_query(col, set(pos.tolist()), set(ign.tolist()))
            worst = max(worst, abs(b * 100 - res[p]["aps"][0]))
    brute = (time.perf_counter() - t0) * len(gnd)
    print(f"brute-force Python loop over the ranking: {brute:.1f}s extrapolated from 1 query "
          f"-> speed-up {brute / ours:.0f}x")
    if worst > 1e-6:
        print("MISMATCH between irkit and the reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

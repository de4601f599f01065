"""+1M evaluation cost: exact streamed revisitop evaluation over a million distractors.

    python bench/plus1m.py [--distractors 1000000] [--dims 2048,512] [--check 100000]

Real ROxf ground truth (70 queries, 4993 database images) with synthetic descriptors: each query's
easy/hard/junk images are noisy copies of it (so the numbers are not trivial), every other database
image and every distractor is a random unit vector, rounded to float16 as a FeatureStore keeps
them. Distractors are generated chunk by chunk (deterministic per chunk), so memory stays bounded.

Prints, per dimension: generation time, streamed-evaluation time (the number that matters), mAP
E/M/H, and the equality check: on the first ``--check`` distractors, the streamed result against
``evaluate_ranks`` on the full materialised ranking (stable argsort of the scores), which must be
identical (every per-query AP, mAP and mP@k).
"""
from __future__ import annotations

import argparse
import logging
import pickle
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from irkit.eval.revisitop import PROTOCOLS, evaluate_ranks, ranks_from_scores
from irkit.eval.streaming import evaluate_streaming

GND = Path(__file__).resolve().parents[2] / "shared/assets/revisitop_gnd/roxford5k/gnd_roxford5k.pkl"
CHUNK = 65536


def unit(x: np.ndarray, dtype=np.float32) -> np.ndarray:
    """L2-normalised rows, rounded to float16 (what a store keeps; distractors stay float16 in memory, 4 GB for 1M x 2048), returned as ``dtype``."""
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16).astype(dtype, copy=False)


def synthetic_dataset(gnd: list[dict], n_db: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = unit(rng.standard_normal((len(gnd), dim), dtype=np.float32))
    db = rng.standard_normal((n_db, dim), dtype=np.float32)
    # an image relevant to several queries (same landmark) gets a share of each of them
    for i, e in enumerate(gnd):
        for key, weight in (("easy", 0.5), ("hard", 0.25), ("junk", 0.15)):
            idx = np.asarray(e[key], dtype=np.int64)
            db[idx] += q[i] * np.sqrt(dim) * weight * rng.random((idx.size, 1), dtype=np.float32)
    return q, unit(db)


def distractor_chunks(n: int, dim: int, seed: int = 1, chunk: int = CHUNK) -> Iterator[np.ndarray]:
    for k, start in enumerate(range(0, n, chunk)):
        rng = np.random.default_rng([seed, k])
        # uniform, not normal: 3x cheaper to draw, and after L2 just as uninformative
        yield unit(rng.random((min(chunk, n - start), dim), dtype=np.float32) - 0.5, np.float16)


def run(gnd: list[dict], n_db: int, dim: int, n_dis: int, n_check: int) -> None:
    q, db = synthetic_dataset(gnd, n_db, dim)
    t0 = time.perf_counter()
    chunks = list(distractor_chunks(n_dis, dim)) if n_dis * dim * 2 <= 4 << 30 else None
    t_gen = time.perf_counter() - t0
    src = chunks if chunks is not None else distractor_chunks(n_dis, dim)
    t0, c0 = time.perf_counter(), time.process_time()
    res = evaluate_streaming(q, db, gnd, iter(src))
    t_eval, c_eval = time.perf_counter() - t0, time.process_time() - c0
    maps = " / ".join(f"{res[p]['map']:.2f}" for p in PROTOCOLS)
    print(f"{dim:5d}-D  +{n_dis:,} distractors: generated in {t_gen:6.1f} s, streamed evaluation "
          f"{t_eval:6.1f} s wall, {c_eval:6.1f} s CPU "
          f"({'in memory' if chunks is not None else 'generated on the fly'});"
          f" mAP E/M/H {maps}")
    # equality against the full ranking on the first n_check distractors
    sub = np.concatenate(list(distractor_chunks(n_check, dim))).astype(np.float32)
    t0 = time.perf_counter()
    stream = evaluate_streaming(q, db, gnd, (sub[i:i + CHUNK] for i in range(0, len(sub), CHUNK)))
    t_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = q @ np.concatenate([db, sub]).T            # [nq, n_db + n_check] float32
    full = evaluate_ranks(ranks_from_scores(scores.T), gnd)
    t_f = time.perf_counter() - t0
    same = all(np.array_equal(stream[p]["aps"], full[p]["aps"], equal_nan=True)
               and all(stream[p][k] == full[p][k] for k in full[p] if k != "aps") for p in PROTOCOLS)
    print(f"        check on +{n_check:,}: streamed {t_s:.1f} s vs full ranking {t_f:.1f} s; "
          f"identical (all APs, mAP, mP@k): {same}")
    if not same:
        raise SystemExit("streamed evaluation differs from the full ranking")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--distractors", type=int, default=1_000_000)
    ap.add_argument("--dims", default="2048,512")
    ap.add_argument("--check", type=int, default=100_000)
    ap.add_argument("--gnd", type=Path, default=GND)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with open(args.gnd, "rb") as fh:
        g = pickle.load(fh)
    print(f"ROxf ground truth: {len(g['qimlist'])} queries, {len(g['imlist'])} database images")
    for dim in (int(d) for d in args.dims.split(",")):
        run(g["gnd"], len(g["imlist"]), dim, args.distractors, args.check)
    return 0


if __name__ == "__main__":
    sys.exit(main())

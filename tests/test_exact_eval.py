"""evaluate_ranks against a transliteration of revisitop's official ``compute_ap`` /
``compute_map`` (written here from the published algorithm) on many random rankings truncated at
random depths, with junk, and on the real ROxf/RPar ground truth at top-100."""
from __future__ import annotations

import math

import numpy as np
import pytest

from irkit.data.revisitop import load_gnd
from irkit.eval import PROTOCOLS, evaluate_ranks, protocol_sets

KAPPAS = (1, 5, 10)


def official_ap(ranks: np.ndarray, nres: int) -> float:
    """compute_ap: trapezoids of the PR curve over the positives found (0-based adjusted ranks)."""
    ap = 0.0
    recall_step = 1.0 / nres
    for j in range(len(ranks)):
        rank = ranks[j]
        precision_0 = 1.0 if rank == 0 else float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def official_map(ranks: np.ndarray, gnd: list[dict], kappas=KAPPAS):
    """compute_map over gnd entries {'ok', 'junk'}; ranks [depth, nq]. Returns map, aps, pr, prs."""
    total = 0.0
    nq = len(gnd)
    aps = np.zeros(nq)
    pr = np.zeros(len(kappas))
    prs = np.zeros((nq, len(kappas)))
    nempty = 0
    for i in range(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i] = float("nan")
            prs[i, :] = float("nan")
            nempty += 1
            continue
        qgndj = np.array(gnd[i]["junk"])
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k = 0
        ij = 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = official_ap(pos, len(qgnd))
        total += ap
        aps[i] = ap
        pos += 1
        for j in range(len(kappas)):
            if len(pos) == 0:       # the official max(pos) raises here; irkit defines precision 0
                prs[i, j] = 0.0
                continue
            kq = min(max(pos), kappas[j])
            prs[i, j] = (pos <= kq).sum() / kq
        pr = pr + prs[i, :]
    return total / (nq - nempty), aps, pr / (nq - nempty), prs


def protocol_gnd(gnd: list[dict], protocol: str) -> list[dict]:
    """The revisitop example's protocol setup (concatenations of easy / hard / junk)."""
    out = []
    for e in gnd:
        easy, hard, junk = list(e["easy"]), list(e["hard"]), list(e["junk"])
        if protocol == "easy":
            out.append({"ok": easy, "junk": junk + hard})
        elif protocol == "medium":
            out.append({"ok": easy + hard, "junk": junk})
        else:
            out.append({"ok": hard, "junk": junk + easy})
    return out


def assert_matches_official(ranks: np.ndarray, gnd: list[dict], n_db: int | None = None) -> None:
    ours = evaluate_ranks(ranks, gnd, kappas=KAPPAS, n_db=n_db)
    for p in PROTOCOLS:
        pg = protocol_gnd(gnd, p)
        if all(len(e["ok"]) == 0 for e in pg):
            assert math.isnan(ours[p]["map"])
            continue
        m, aps, pr, _ = official_map(ranks, pg)
        assert ours[p]["map"] == pytest.approx(100 * m, abs=1e-9), p
        np.testing.assert_allclose(ours[p]["aps"], 100 * aps, atol=1e-9, equal_nan=True)
        for k, v in zip(KAPPAS, pr):
            assert ours[p][f"mp@{k}"] == pytest.approx(100 * v, abs=1e-9), (p, k)


def random_case(rng: np.random.Generator):
    n_db = int(rng.integers(2, 120))
    nq = int(rng.integers(1, 6))
    gnd = []
    for _ in range(nq):
        labels = rng.choice(4, size=n_db, p=rng.dirichlet(np.ones(4)))      # easy/hard/junk/negative
        gnd.append({"bbx": None, "easy": np.flatnonzero(labels == 0).tolist(),
                    "hard": np.flatnonzero(labels == 1).tolist(), "junk": np.flatnonzero(labels == 2).tolist()})
    scores = rng.random((n_db, nq))
    for q, e in enumerate(gnd):                                              # better than chance
        scores[e["easy"], q] += rng.random() * 2 * rng.random(len(e["easy"]))
        scores[e["junk"], q] += rng.random() * 2 * rng.random(len(e["junk"]))
    full = np.argsort(-scores, axis=0, kind="stable")
    depth = int(rng.integers(1, n_db + 1))
    return full[:depth], gnd, n_db


def test_truncated_rankings_match_official_compute_map():
    rng = np.random.default_rng(14)
    depths = []
    for _ in range(150):
        ranks, gnd, n_db = random_case(rng)
        assert_matches_official(ranks, gnd, n_db=n_db)
        assert_matches_official(ranks, gnd)                                  # database size unknown
        depths.append(ranks.shape[0] / n_db)
    assert min(depths) < 0.1 and max(depths) == 1.0                          # truncated and full


def test_no_positive_in_top_k():
    gnd = [{"bbx": None, "easy": [5, 6], "hard": [7], "junk": [0]}]
    ranks = np.array([[0, 1, 2]]).T
    res = evaluate_ranks(ranks, gnd, n_db=10)
    for p in PROTOCOLS:
        assert res[p]["map"] == 0.0 and res[p]["mp@1"] == 0.0 and res[p]["mp@10"] == 0.0


@pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
def test_real_ground_truth_top_100(revisitop_gnd_dir, name):
    g = load_gnd(revisitop_gnd_dir / name / f"gnd_{name}.pkl")
    n_db = len(g["imlist"])
    rng = np.random.default_rng(5)
    scores = rng.random((n_db, len(g["gnd"])))
    for q, e in enumerate(g["gnd"]):
        pos, ign = protocol_sets(e, "medium")
        scores[pos, q] += 1.5 * rng.random(len(pos))
        scores[ign, q] += 1.5 * rng.random(len(ign))
    ranks = np.argsort(-scores, axis=0, kind="stable")[:100]
    assert_matches_official(ranks, g["gnd"])
    top = evaluate_ranks(ranks, g)                                           # n_db from imlist
    full = evaluate_ranks(np.argsort(-scores, axis=0, kind="stable"), g)
    assert top["medium"]["map"] < full["medium"]["map"]                      # positives beyond 100 lost

"""GLDv2 retrieval mAP@100 (Kaggle definition)."""
from __future__ import annotations

import numpy as np
import pytest

from irkit.data.gldv2 import RetrievalSolution
from irkit.errors import RankingError
from irkit.eval.gldv2 import ap_at_k, evaluate_gldv2, predictions_from_ranks


def test_ap_hand_worked():
    # relevant {a, b, c}; predictions x a a b y:
    # hit 1 at i=2 -> P=1/2; the repeated a at i=3 earns nothing; hit 2 at i=4 -> P=2/4
    # AP = (1/2 + 2/4) / min(3, 100) = 1/3
    assert ap_at_k(["x", "a", "a", "b", "y"], {"a", "b", "c"}) == pytest.approx(1 / 3)
    assert ap_at_k(["a", "b", "c"], ["c", "b", "a"]) == pytest.approx(1.0)
    assert ap_at_k([], {"a"}) == 0.0


def test_ap_cut_at_k_and_normalised_by_min():
    rel = {f"r{i}" for i in range(150)}
    assert ap_at_k(sorted(rel), rel, k=100) == pytest.approx(1.0)   # 100 hits / min(150, 100)
    assert ap_at_k(["x"] * 100 + ["a"], {"a"}, k=100) == 0.0        # the hit at 101 does not count
    assert ap_at_k(["x", "a"], {"a"}, k=2) == pytest.approx(0.5)
    with pytest.raises(RankingError):
        ap_at_k(["a"], set())


def test_ap_matches_vectorised_formula():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n_idx = 300
        rel = set(rng.choice(n_idx, rng.integers(1, 120), replace=False).tolist())
        preds = rng.permutation(n_idx)[:100].tolist()
        hit = np.array([p in rel for p in preds], dtype=float)
        expect = np.sum(np.cumsum(hit) / np.arange(1, 101) * hit) / min(len(rel), 100)
        assert ap_at_k(preds, rel) == pytest.approx(expect)


def test_evaluate_splits_and_missing():
    sol = RetrievalSolution(
        relevant={"q1": ["a", "b"], "q2": ["c"], "q3": [], "q4": ["d"]},
        usage={"q1": "Private", "q2": "Public", "q3": "Ignored", "q4": "Private"})
    preds = {"q1": ["a", "z", "b"], "q2": "x c", "q3": ["a"]}
    r = evaluate_gldv2(preds, sol, split="private")
    # q1: (1/1 + 2/3)/2 = 5/6; q4 missing -> 0
    assert r["aps"] == pytest.approx({"q1": 500 / 6, "q4": 0.0})
    assert r["map@100"] == pytest.approx(500 / 12) and r["n_queries"] == 2 and r["n_missing"] == 1
    pub = evaluate_gldv2(preds, sol, split="public")
    assert pub["map@100"] == pytest.approx(50.0)  # c at rank 2
    assert evaluate_gldv2(preds, sol, split="all")["n_queries"] == 3
    with pytest.raises(RankingError):
        evaluate_gldv2(preds, sol, k=0)


def test_predictions_from_ranks():
    ranks = np.array([[2, 0, 1], [1, 2, 0]])
    p = predictions_from_ranks(ranks, ["q1", "q2"], ["a", "b", "c"], k=2)
    assert p == {"q1": ["c", "a"], "q2": ["b", "c"]}
    for bad in (np.array([[3, 0]] * 2), np.array([[0.0, 1.0]] * 2), np.array([0, 1])):
        with pytest.raises(RankingError):
            predictions_from_ranks(bad, ["q1", "q2"], ["a", "b", "c"])

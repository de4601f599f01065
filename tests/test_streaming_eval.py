"""Streamed +N evaluation (irkit.eval.streaming) equals evaluate_ranks on the full ranking exactly."""
from __future__ import annotations

import numpy as np
import pytest

from irkit.errors import RankingError
from irkit.eval.revisitop import PROTOCOLS, evaluate_ranks, ranks_from_scores
from irkit.eval.streaming import evaluate_streaming, evaluate_with_distractors, store_chunks
from irkit.store import FeatureStore


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _case(n_q=12, n_db=600, n_dis=20000, dim=32, seed=0, quant=None):
    rng = np.random.default_rng(seed)
    q = _unit(rng.standard_normal((n_q, dim)))
    db = rng.standard_normal((n_db, dim)).astype(np.float32)
    gnd = []
    for i in range(n_q):
        idx = rng.choice(n_db, 40, replace=False)
        db[idx[:25]] += 2.0 * q[i] * rng.random((25, 1)).astype(np.float32) * np.sqrt(dim)
        gnd.append({"easy": idx[:10].tolist(), "hard": idx[10:25].tolist(), "junk": idx[25:40].tolist()})
    gnd.append({"easy": [], "hard": [], "junk": [3]})  # a query without positives: excluded (NaN)
    q = np.concatenate([q, _unit(rng.standard_normal((1, dim)))])
    db, dis = _unit(db), _unit(rng.standard_normal((n_dis, dim)))
    if quant:  # coarse values: many exact score ties between database images and distractors
        q, db, dis = (np.round(a * quant) / quant for a in (q, db, dis))
        q, db, dis = (a.astype(np.float32) for a in (q, db, dis))
    return q, db, dis, gnd


def _assert_identical(a: dict, b: dict) -> None:
    for p in PROTOCOLS:
        assert np.array_equal(a[p]["aps"], b[p]["aps"], equal_nan=True)
        for key in b[p]:
            if key != "aps":
                assert a[p][key] == b[p][key], (p, key)


@pytest.mark.parametrize("quant", [None, 4])
def test_streaming_equals_full_ranking(quant):
    q, db, dis, gnd = _case(quant=quant)
    full = evaluate_ranks(ranks_from_scores((q @ np.concatenate([db, dis]).T).T), gnd)
    chunks = (dis[i:i + 3001] for i in range(0, len(dis), 3001))
    got = evaluate_streaming(q, db, gnd, chunks)
    _assert_identical(got, full)
    assert got["n_distractors"] == len(dis)
    assert 0 < got["medium"]["map"] < 100  # not a degenerate case


def test_no_distractors_equals_database_only():
    q, db, _, gnd = _case(n_dis=0)
    _assert_identical(evaluate_streaming(q, db, gnd, []), evaluate_ranks(ranks_from_scores((q @ db.T).T), gnd))


def test_streaming_from_float16_store(tmp_path):
    q, db, dis, gnd = _case(n_dis=5000)
    store = FeatureStore.open_or_create(tmp_path / "dis", model="synthetic", config={}, dim=dis.shape[1])
    store.add([f"d{i}" for i in range(len(dis))], [""] * len(dis), dis)
    dis16 = dis.astype(np.float16).astype(np.float32)
    full = evaluate_ranks(ranks_from_scores((q @ np.concatenate([db, dis16]).T).T), gnd)
    _assert_identical(evaluate_streaming(q, db, gnd, store_chunks(store, 999)), full)
    _assert_identical(evaluate_with_distractors(q, db, gnd, tmp_path / "dis", progress=False), full)


def test_bad_inputs():
    q, db, dis, gnd = _case(n_dis=10)
    with pytest.raises(RankingError, match="distractor chunk"):
        evaluate_streaming(q, db, gnd, [dis[:, :5]])
    with pytest.raises(RankingError, match="database index"):
        evaluate_streaming(q, db[:10], gnd, [dis])

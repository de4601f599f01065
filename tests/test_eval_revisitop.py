"""revisitop protocol: agreement with a brute-force transcription of METHODS.md §1, properties,
a hand-worked example and ranking validation."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from irkit.data.revisitop import load_gnd
from irkit.errors import RankingError
from irkit.eval.revisitop import (PROTOCOLS, evaluate_positions, evaluate_ranks, format_table,
                                  ranks_from_scores)

KAPPAS = (1, 5, 10)


# ------------------------------------------------------------------ brute force (plain loops)

def _sets(entry, protocol):
    easy, hard, junk = set(entry["easy"]), set(entry["hard"]), set(entry["junk"])
    if protocol == "easy":
        return easy, junk | hard
    if protocol == "medium":
        return easy | hard, junk
    return hard, junk | easy


def brute_query(ranking, positives, ignored, kappas=KAPPAS):
    """Walk the ranking, drop ignored images, note the (0-based) rank of each positive."""
    adjusted = []
    kept = 0
    for idx in ranking:
        if idx in ignored:
            continue
        if idx in positives:
            adjusted.append(kept)
        kept += 1
    n = len(positives)
    ap = 0.0
    for j, r in enumerate(adjusted):
        before = 1.0 if r == 0 else j / r
        after = (j + 1) / (r + 1)
        ap += (before + after) / 2.0 / n
    prs = []
    one_based = [r + 1 for r in adjusted]
    for k in kappas:
        kq = min(max(one_based), k)
        prs.append(sum(1 for r in one_based if r <= kq) / kq)
    return ap, prs


def brute_evaluate(ranks, gnd, kappas=KAPPAS):
    out = {}
    for p in PROTOCOLS:
        aps, prs = [], []
        for q, entry in enumerate(gnd):
            pos, ign = _sets(entry, p)
            if not pos:
                aps.append(math.nan)
                continue
            ap, pr = brute_query(ranks[:, q].tolist(), pos, ign, kappas)
            aps.append(ap)
            prs.append(pr)
        valid = [a for a in aps if not math.isnan(a)]
        res = {"map": 100 * sum(valid) / len(valid), "aps": [100 * a for a in aps]}
        for i, k in enumerate(kappas):
            res[f"mp@{k}"] = 100 * sum(pr[i] for pr in prs) / len(prs)
        out[p] = res
    return out


def assert_same(fast, slow, tol=1e-6):
    for p in PROTOCOLS:
        for key in ["map"] + [f"mp@{k}" for k in KAPPAS]:
            assert fast[p][key] == pytest.approx(slow[p][key], abs=tol), (p, key)
        np.testing.assert_allclose(fast[p]["aps"], np.array(slow[p]["aps"]), atol=tol, equal_nan=True)


def noisy_ranking(gnd, n_db, rng, strength):
    """Rankings that put positives near the top with noise: non-trivial APs."""
    nq = len(gnd)
    scores = rng.random((n_db, nq))
    for q, e in enumerate(gnd):
        scores[e["easy"], q] += strength * rng.random(len(e["easy"]))
        scores[e["hard"], q] += 0.5 * strength * rng.random(len(e["hard"]))
        scores[e["junk"], q] += strength * rng.random(len(e["junk"]))
    return ranks_from_scores(scores)


# ------------------------------------------------------------------ real ground truth

@pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
def test_matches_brute_force_on_real_gnd(revisitop_gnd_dir, name):
    g = load_gnd(revisitop_gnd_dir / name / f"gnd_{name}.pkl")
    n_db = len(g["imlist"])
    rng = np.random.default_rng(1 if name == "roxford5k" else 2)
    random_ranks = np.stack([rng.permutation(n_db) for _ in g["gnd"]], axis=1)
    good_ranks = noisy_ranking(g["gnd"], n_db, rng, strength=3.0)
    for ranks in (random_ranks, good_ranks):
        assert_same(evaluate_ranks(ranks, g["gnd"]), brute_evaluate(ranks, g["gnd"]))
    # the good ranking is good, the random one is near chance
    assert evaluate_ranks(good_ranks, g["gnd"])["medium"]["map"] > 50
    assert evaluate_ranks(random_ranks, g["gnd"])["medium"]["map"] < 10


def test_real_gnd_excludes_queries_without_positives(revisitop_gnd_dir):
    g = load_gnd(revisitop_gnd_dir / "roxford5k" / "gnd_roxford5k.pkl")
    empty_easy = [q for q, e in enumerate(g["gnd"]) if not e["easy"]]
    assert empty_easy, "ROxf has queries without easy positives"
    ranks = np.stack([np.arange(len(g["imlist"]))] * len(g["gnd"]), axis=1)
    res = evaluate_ranks(ranks, g["gnd"])
    assert np.isnan(res["easy"]["aps"][empty_easy]).all()
    assert not np.isnan(res["medium"]["aps"]).any()
    assert res["easy"]["map"] == pytest.approx(np.nanmean(res["easy"]["aps"]))


def test_plus_distractor_rows_are_allowed(minidev_dir):
    g = load_gnd(minidev_dir / "minidev" / "gnd_minidev.pkl")
    n_db = len(g["imlist"]) + 500  # 500 distractors appended after the database
    rng = np.random.default_rng(3)
    ranks = np.stack([rng.permutation(n_db) for _ in g["gnd"]], axis=1)
    assert_same(evaluate_ranks(ranks, g["gnd"]), brute_evaluate(ranks, g["gnd"]))
    with pytest.raises(RankingError, match="rows but the database has"):
        evaluate_ranks(ranks, g["gnd"], n_db=len(g["imlist"]))


# ------------------------------------------------------------------ hand-worked example

def test_hand_worked_example():
    # Database of 6 images, 2 queries (column q of `ranks` = ranking of query q).
    # q0: easy {0, 2}, hard {4}, junk {5};  ranking 3 0 5 1 4 2  (0-based positions 0..5)
    #   positions: 0 -> 1, 5 -> 2, 4 -> 4, 2 -> 5
    #   Easy  : pos {0,2}, ignored {5,4}: adjusted ranks 1 and 5-2=3
    #           AP = [(0/1 + 1/2)/2 + (1/3 + 2/4)/2] / 2 = (0.25 + 0.416667)/2 = 0.333333
    #           one-based 2, 4: P@1: kq=1 -> 0/1; P@5: kq=min(4,5)=4 -> 2/4; P@10: kq=4 -> 2/4
    #   Medium: pos {0,2,4}, ignored {5}: adjusted 1, 4-1=3, 5-1=4
    #           AP = [(0+1/2)/2 + (1/3+2/4)/2 + (2/4+3/5)/2] / 3 = (0.25+0.416667+0.55)/3 = 0.405556
    #           one-based 2, 4, 5: P@1 = 0; P@5: kq=5 -> 3/5; P@10: kq=5 -> 3/5
    #   Hard  : pos {4}, ignored {5,0,2}: 0 and 5 are before it -> adjusted 4-2 = 2
    #           AP = (0/2 + 1/3)/2 = 0.166667;  one-based 3: P@1 = 0; P@5: kq=3 -> 1/3; P@10: 1/3
    # q1: easy {1}, hard {}, junk {};  ranking 1 0 2 3 4 5
    #   Easy = Medium: AP = (1 + 1)/2 = 1; P@k = 1.   Hard: no positives -> excluded (NaN)
    # Means: Easy mAP (33.3333+100)/2 = 66.6667, mP@1 (0+100)/2 = 50, mP@5 (50+100)/2 = 75
    #        Medium mAP (40.5556+100)/2 = 70.2778, mP@5 = mP@10 = (60+100)/2 = 80
    #        Hard mAP 16.6667 (q0 only), mP@1 0, mP@5 = mP@10 = 33.3333
    gnd = [{"bbx": None, "easy": [0, 2], "hard": [4], "junk": [5]},
           {"bbx": None, "easy": [1], "hard": [], "junk": []}]
    ranks = np.array([[3, 0, 5, 1, 4, 2], [1, 0, 2, 3, 4, 5]]).T
    r = evaluate_ranks(ranks, gnd)
    np.testing.assert_allclose(r["easy"]["aps"], [100 / 3, 100], atol=1e-9)
    np.testing.assert_allclose(r["medium"]["aps"], [(0.25 + 5 / 12 + 0.55) / 3 * 100, 100], atol=1e-9)
    assert r["hard"]["aps"][0] == pytest.approx(100 / 6) and np.isnan(r["hard"]["aps"][1])
    assert r["easy"]["map"] == pytest.approx(66.666667, abs=1e-5)
    assert (r["easy"]["mp@1"], r["easy"]["mp@5"], r["easy"]["mp@10"]) == pytest.approx((50, 75, 75))
    assert r["medium"]["map"] == pytest.approx(70.277778, abs=1e-5)
    assert (r["medium"]["mp@1"], r["medium"]["mp@5"], r["medium"]["mp@10"]) == pytest.approx((50, 80, 80))
    assert r["hard"]["map"] == pytest.approx(16.666667, abs=1e-5)
    assert (r["hard"]["mp@1"], r["hard"]["mp@5"], r["hard"]["mp@10"]) == pytest.approx((0, 100 / 3, 100 / 3))
    assert_same(r, brute_evaluate(ranks, gnd))
    table = format_table(r)
    assert "Medium" in table and "70.28" in table and "mP@10" in table


def test_protocol_subset_scores_only_those(caplog):
    """Label-based validation asks for "easy" alone: the same numbers as the full evaluation, and
    no warning about the empty Hard protocol."""
    gnd = [{"bbx": None, "easy": [0, 2], "hard": [], "junk": [5]},
           {"bbx": None, "easy": [1], "hard": [], "junk": []}]
    ranks = np.array([[3, 0, 5, 1, 4, 2], [1, 0, 2, 3, 4, 5]]).T
    full = evaluate_ranks(ranks, gnd)                                 # warns: Hard has no positives
    caplog.clear()
    with caplog.at_level("WARNING"):
        easy = evaluate_ranks(ranks, gnd, protocols=("easy",))
    assert list(easy) == ["easy"] and not caplog.records
    assert easy["easy"]["map"] == full["easy"]["map"]
    np.testing.assert_array_equal(easy["easy"]["aps"], full["easy"]["aps"])


def test_evaluate_positions_truncated_and_streaming():
    # positives at 0 and 3 found, a third positive never ranked (n_pos=3) adds 0
    res = evaluate_positions([np.array([3, 0])], [np.array([1])], n_pos=[3])
    # adjusted 0 and 2: AP = [(1+1)/2 + (1/2+2/3)/2] / 3
    assert res["aps"][0] == pytest.approx((1 + (0.5 + 2 / 3) / 2) / 3 * 100)
    empty = evaluate_positions([np.array([], dtype=int)], [np.array([], dtype=int)])
    assert math.isnan(empty["map"]) and math.isnan(empty["aps"][0])
    with pytest.raises(RankingError):
        evaluate_positions([np.array([1])], [])


# ------------------------------------------------------------------ properties

@st.composite
def gnd_and_ranking(draw):
    n_db = draw(st.integers(3, 40))
    nq = draw(st.integers(1, 4))
    labels = draw(st.lists(st.lists(st.sampled_from("ehjn"), min_size=n_db, max_size=n_db),
                           min_size=nq, max_size=nq))
    gnd = [{"bbx": None, "easy": [i for i, c in enumerate(lab) if c == "e"],
            "hard": [i for i, c in enumerate(lab) if c == "h"],
            "junk": [i for i, c in enumerate(lab) if c == "j"]} for lab in labels]
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    ranks = np.stack([rng.permutation(n_db) for _ in range(nq)], axis=1)
    return gnd, ranks, rng


@settings(max_examples=60, deadline=None)
@given(gnd_and_ranking())
def test_property_matches_brute_force(data):
    gnd, ranks, _ = data
    if not any(e["easy"] for e in gnd) or not any(e["hard"] for e in gnd):
        return
    assert_same(evaluate_ranks(ranks, gnd), brute_evaluate(ranks, gnd))


@settings(max_examples=60, deadline=None)
@given(gnd_and_ranking())
def test_property_perfect_ranking_is_100(data):
    gnd, ranks, rng = data
    for p in PROTOCOLS:
        perfect = ranks.copy()
        for q, e in enumerate(gnd):
            pos, _ = _sets(e, p)
            col = list(ranks[:, q])
            perfect[:, q] = [i for i in col if i in pos] + [i for i in col if i not in pos]
        if not any(_sets(e, p)[0] for e in gnd):
            continue
        r = evaluate_ranks(perfect, gnd)[p]
        assert r["map"] == pytest.approx(100.0)
        for k in KAPPAS:
            assert r[f"mp@{k}"] == pytest.approx(100.0)


@settings(max_examples=60, deadline=None)
@given(gnd_and_ranking(), st.data())
def test_property_moving_ignored_changes_nothing(data, extra):
    gnd, ranks, _ = data
    for p in PROTOCOLS:
        before = evaluate_ranks(ranks, gnd)[p]
        moved = ranks.copy()
        for q, e in enumerate(gnd):
            _, ign = _sets(e, p)
            if not ign:
                continue
            col = list(moved[:, q])
            item = extra.draw(st.sampled_from(sorted(ign)))
            col.remove(item)
            col.insert(extra.draw(st.integers(0, len(col))), item)
            moved[:, q] = col
        after = evaluate_ranks(moved, gnd)[p]
        np.testing.assert_allclose(after["aps"], before["aps"], equal_nan=True, atol=1e-9)
        for k in KAPPAS:
            assert after[f"mp@{k}"] == pytest.approx(before[f"mp@{k}"], nan_ok=True)


@settings(max_examples=60, deadline=None)
@given(gnd_and_ranking(), st.data())
def test_property_moving_positive_down_never_raises_ap(data, extra):
    gnd, ranks, _ = data
    for p in PROTOCOLS:
        before = evaluate_ranks(ranks, gnd)[p]["aps"]
        moved = ranks.copy()
        for q, e in enumerate(gnd):
            pos, _ = _sets(e, p)
            if not pos:
                continue
            col = list(moved[:, q])
            item = extra.draw(st.sampled_from(sorted(pos)))
            start = col.index(item)
            col.remove(item)
            col.insert(extra.draw(st.integers(start, len(col))), item)
            moved[:, q] = col
        after = evaluate_ranks(moved, gnd)[p]["aps"]
        ok = ~np.isnan(before)
        assert (after[ok] <= before[ok] + 1e-9).all()


# ------------------------------------------------------------------ validation

GND = [{"bbx": None, "easy": [0], "hard": [1], "junk": [2]}] * 2


@pytest.mark.parametrize("ranks, n_db, match", [
    (np.arange(4), None, "2-D"),
    (np.zeros((4, 2, 1), dtype=int), None, "2-D"),
    (np.array([[0, 1, 2, 3]] * 2, dtype=float).T, None, "integer"),
    (np.array([[0, 1, 2, 3]] * 2, dtype=bool).T, None, "integer"),
    (np.array([[0, 1, 2, 3]] * 3).T, None, "2 queries"),
    (np.array([[0, 1, 2, 3]] * 2), None, "query-major"),
    (np.array([[0, 1, 2, 4], [0, 1, 2, 3]]).T, 4, r"database index 4 \(query 0, rank 3\) but the database has 4"),
    (np.array([[1, 2, 3, 4], [0, 1, 2, 3]]).T, 4, "1-based"),
    (np.array([[0, 1, -1, 3], [0, 1, 2, 3]]).T, None, "negative index -1"),
    (np.array([[0, 1, 1, 3], [0, 1, 2, 3]]).T, None, "repeats database index 1"),
    (np.array([[0, 1, 1], [0, 1, 2]]).T, 10, "repeats"),                  # top-k too
    (np.zeros((0, 2), dtype=int), None, "empty"),
    (np.array([[0, 1, 2, 3, 4]] * 2).T, 4, "5 rows but the database has 4"),
    (np.array([[0, 1], [1, 0]]), 2, "refers to database index 2"),
    ([[0, 1, 2, 3]], None, "numpy array"),
])
def test_ranking_validation(ranks, n_db, match):
    with pytest.raises(RankingError, match=match):
        evaluate_ranks(ranks, GND, n_db=n_db)


def test_top_k_is_accepted_and_db_size_comes_from_the_ground_truth():
    whole = {"imlist": [f"d{i}" for i in range(150)], "qimlist": ["q0", "q1"], "gnd": GND}
    top = np.array([[399, 0, 7], [1, 2, 0]]).T                               # the case
    with pytest.raises(RankingError, match="database index 399 .* the database has 150 images"):
        evaluate_ranks(top, whole)
    top[0, 0] = 149
    res = evaluate_ranks(top, whole)                                         # depth 3 of 150
    # q0: ranking 149 0 7: easy positive 0 at rank 1, hard 1 absent; q1: 1 2 0
    # AP term of a positive at adjusted rank 1, found first: (0/1 + 1/2) / 2 = 0.25
    assert res["easy"]["aps"][0] == pytest.approx(25.0)
    assert res["medium"]["aps"][0] == pytest.approx(12.5)                    # 1 of 2 positives found
    # mP@5, medium: q0 one-based [2] -> kq 2 -> 1/2; q1 (junk 2 removed) [1, 2] -> kq 2 -> 2/2
    assert res["medium"]["mp@5"] == pytest.approx(100 * (1 / 2 + 1) / 2)
    assert evaluate_ranks(top, GND)["medium"]["map"] == res["medium"]["map"]     # same without n_db


def test_ranks_from_scores_descending_and_stable():
    scores = np.array([[0.1, 0.5], [0.9, 0.5], [0.5, 0.7], [0.9, 0.1]], dtype=np.float32)
    ranks = ranks_from_scores(scores)
    assert ranks[:, 0].tolist() == [1, 3, 2, 0]  # ties (0.9) keep the lower index first
    assert ranks[:, 1].tolist() == [2, 0, 1, 3]
    assert ranks.dtype.kind == "i"
    assert ranks_from_scores(np.array([[1], [3], [2]], dtype=np.int64))[:, 0].tolist() == [1, 2, 0]
    for bad in (np.array([1.0, 2.0]), np.array([[np.nan], [1.0]]), np.array([["a"], ["b"]])):
        with pytest.raises(RankingError):
            ranks_from_scores(bad)

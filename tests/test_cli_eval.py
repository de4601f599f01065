"""`irkit eval --gnd ... --ranks/--scores ...`."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from irkit.cli import main

GND = {"imlist": [f"d{i}" for i in range(6)], "qimlist": ["q0", "q1"],
       "gnd": [{"bbx": None, "easy": [0, 2], "hard": [4], "junk": [5]},
               {"bbx": None, "easy": [1], "hard": [], "junk": []}]}
RANKS = np.array([[3, 0, 5, 1, 4, 2], [1, 0, 2, 3, 4, 5]]).T  # the hand-worked example of test_eval_revisitop


@pytest.fixture
def files(tmp_path):
    g = tmp_path / "gnd_toy.pkl"
    g.write_bytes(pickle.dumps(GND))
    r = tmp_path / "ranks.npy"
    np.save(r, RANKS)
    return tmp_path, g, r


def _run(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_output(files, capsys):
    _, g, r = files
    code, out, _ = _run(capsys, ["eval", "--gnd", str(g), "--ranks", str(r), "--json"])
    assert code == 0
    res = json.loads(out)
    assert list(res) == ["easy", "medium", "hard"]
    for p in res.values():
        assert list(p) == ["map", "mp@1", "mp@5", "mp@10"]
    assert res["easy"]["map"] == pytest.approx(66.666667, abs=1e-5)
    assert res["medium"]["map"] == pytest.approx(70.277778, abs=1e-5)
    assert res["hard"] == pytest.approx({"map": 100 / 6, "mp@1": 0.0, "mp@5": 100 / 3, "mp@10": 100 / 3})


def test_table_query_major_and_scores(files, capsys):
    tmp, g, r = files
    code, table, _ = _run(capsys, ["eval", "--gnd", str(g), "--ranks", str(r)])
    assert code == 0 and "Medium" in table and "70.28" in table
    qm = tmp / "qm.npy"
    np.save(qm, RANKS.T)
    assert _run(capsys, ["eval", "--gnd", str(g), "--ranks", str(qm), "--query-major"])[1] == table
    scores = np.zeros((6, 2), dtype=np.float32)
    for q in range(2):
        scores[RANKS[:, q], q] = np.linspace(1, 0, 6)
    s = tmp / "s.npy"
    np.save(s, scores)
    assert _run(capsys, ["eval", "--gnd", str(g), "--scores", str(s)])[1] == table


def test_errors(files, capsys):
    tmp, g, r = files
    qm = tmp / "qm.npy"
    np.save(qm, RANKS.T)
    fl = tmp / "f.npy"
    np.save(fl, RANKS.astype(np.float32))
    dup = tmp / "dup.npy"
    bad = RANKS.copy()
    bad[0, 0] = bad[1, 0]
    np.save(dup, bad)
    junk = tmp / "junk.npy"
    junk.write_bytes(b"not numpy")
    cases = [
        (["eval"], "nothing to evaluate"),
        (["eval", "--ranks", str(r)], "nothing to evaluate"),
        (["eval", "--gnd", str(g)], "needs --ranking"),
        (["eval", "--gnd", str(tmp / "none.pkl"), "--ranks", str(r)], "none.pkl not found"),
        (["eval", "--gnd", str(g), "--ranks", str(tmp / "none.npy")], "none.npy not found"),
        (["eval", "--gnd", str(g), "--ranks", str(qm)], "--query-major"),
        (["eval", "--gnd", str(g), "--ranks", str(fl)], "integer"),
        (["eval", "--gnd", str(g), "--ranks", str(dup)], "repeats"),
        (["eval", "--gnd", str(g), "--ranks", str(junk)], "cannot be read"),
    ]
    for argv, msg in cases:
        code, out, err = _run(capsys, argv)
        assert code == 1, argv
        assert err.startswith("irkit eval: error:") and msg in err, (argv, err)
        assert "Traceback" not in err and out == ""


def test_top_k_ranks_file(files, capsys):
    tmp, g, _ = files
    top = tmp / "top3.npy"
    np.save(top, RANKS[:3])                                  # each query's top 3 of 6
    code, out, _ = _run(capsys, ["eval", "--gnd", str(g), "--ranks", str(top), "--json"])
    assert code == 0
    # q0 top-3 = 3 0 5, Easy positives {0, 2}: 0 at rank 1 -> AP (0/1 + 1/2) / 2 / 2 = 0.125; q1: AP 1
    assert json.loads(out)["easy"]["map"] == pytest.approx((12.5 + 100) / 2)
    bad = tmp / "bad.npy"
    arr = RANKS[:3].copy()
    arr[2, 1] = 6                                            # no image 6 in a 6-image database
    np.save(bad, arr)
    code, _, err = _run(capsys, ["eval", "--gnd", str(g), "--ranks", str(bad)])
    assert code == 1 and "database index 6 (query 1, rank 2) but the database has 6 images" in err
    code, out, _ = _run(capsys, ["eval", "--gnd", str(g), "--ranks", str(bad), "--n-distractors", "10", "--json"])
    assert code == 0 and json.loads(out)["easy"]["map"] == pytest.approx((12.5 + 100) / 2)

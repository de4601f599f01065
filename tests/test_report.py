"""irkit.eval.report.write_report: table numbers, plots, per-query sections with marked thumbnails."""
from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("matplotlib")
from irkit.eval.report import marks, pr_curve, write_report  # noqa: E402
from irkit.eval.revisitop import evaluate_ranks  # noqa: E402

GND = [
    {"easy": [0, 1], "hard": [2], "junk": [3], "bbx": [2, 2, 20, 20]},
    {"easy": [4], "hard": [5, 6], "junk": [], "bbx": None},
    {"easy": [], "hard": [7], "junk": [8, 9], "bbx": None},
]


def _dataset(tmp_path, n_db=12):
    rng = np.random.default_rng(0)
    folder = tmp_path / "jpg"
    folder.mkdir()
    paths = []
    for i in range(n_db + len(GND)):
        p = folder / f"im{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return SimpleNamespace(name="toy", imlist=[f"im{i}" for i in range(n_db)],
                           qimlist=[f"im{n_db + q}" for q in range(len(GND))],
                           db_paths=paths[:n_db], query_paths=paths[n_db:],
                           query_bbx=[tuple(g["bbx"]) if g["bbx"] else None for g in GND])


def _ranks(n_db=12):
    rng = np.random.default_rng(1)
    cols = [np.array([0, 3, 1, 9, 2] + [i for i in range(n_db) if i not in (0, 3, 1, 9, 2)])]
    cols += [rng.permutation(n_db) for _ in range(len(GND) - 1)]
    return np.stack(cols, axis=1)


def test_report_has_table_plots_and_queries(tmp_path):
    ds = _dataset(tmp_path)
    ranks = _ranks()
    results = evaluate_ranks(ranks, GND)
    out = write_report(results, ranks, GND, ds, tmp_path / "out" / "report.html", top=10)
    text = out.read_text()
    for p in ("easy", "medium", "hard"):
        assert f"{results[p]['map']:.2f}" in text
        assert f"{results[p]['mp@5']:.2f}" in text
    assets = out.parent / "report_files"
    for png in ("ap_per_query.png", "precision_recall.png"):
        assert (assets / png).stat().st_size > 1000
        assert Image.open(assets / png).format == "PNG"
        assert f"report_files/{png}" in text
    assert text.count("<section class='query'") == 3
    q0 = re.search(r"<section class='query' id='q0'>.*?</section>", text, re.S).group(0)
    # query 0's ranking: 0 (pos), 3 (junk -> ignored), 1 (pos), 9 (neg), 2 (hard -> pos under Medium)
    assert [m for m in re.findall(r"<figure class='(\w+)'", q0)][:6] == \
        ["q", "positive", "ignored", "positive", "negative", "positive"]
    assert q0.count("<figure") == 11                         # query + top-10
    assert (assets / "q00000.jpg").exists()
    assert Image.open(assets / "q00000.jpg").size == (18, 18)   # the query is cropped to its bbx
    # query 2 has no Easy positive: its Easy AP is excluded and shown as n/a
    assert "E n/a" in text


def test_report_without_images(tmp_path):
    ranks = _ranks()
    out = write_report(evaluate_ranks(ranks, GND), ranks, GND, "toy", tmp_path / "r.html", top=5,
                       thumbnails=False)
    text = out.read_text()
    assert "toy" in text and text.count("class='noimg'") == 3 * 6


def test_pr_curve_and_marks():
    ranking = np.array([0, 3, 1, 9, 2, 4, 5, 6, 7, 8, 10, 11])
    rec, prec = pr_curve(ranking, GND[0], "medium")
    assert np.allclose(rec, [1 / 3, 2 / 3, 1]) and np.allclose(prec, [1, 1, 0.75])
    assert marks(ranking, GND[0], 4) == ["positive", "ignored", "positive", "negative"]
    assert marks(ranking, GND[0], 5, "easy")[4] == "ignored"    # hard is ignored under Easy

"""Near-duplicate finding: pairs through the index, groups, the kept member, reports, the CLI."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from irkit.cli import main as cli_main
from irkit.errors import ConfigError
from irkit.search.dedup import (check_threshold, connected_groups, find_pairs, group_duplicates, write_html,
                                write_json)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _planted(n: int = 200, dim: int = 64, seed: int = 0):
    """n random unit vectors; rows 1, 2 are near-copies of row 0 (cos ~0.99), row 4 of row 3."""
    rng = np.random.default_rng(seed)
    x = _unit(rng.standard_normal((n, dim)))
    for src, dst in ((0, 1), (0, 2), (3, 4)):
        x[dst] = _unit((x[src] + 0.012 * rng.standard_normal(dim))[None])[0]
    return x


def test_find_pairs_planted_and_nothing_else():
    a, b, s = find_pairs(_planted(), 0.9, progress=False)
    assert {(int(i), int(j)) for i, j in zip(a, b)} == {(0, 1), (0, 2), (1, 2), (3, 4)}
    assert np.all(s >= 0.9) and np.all(s <= 1.0001)


def test_find_pairs_grows_k_for_big_groups():
    # 40 copies of one vector: with k=4 each row's 4th neighbour is still a copy, so k must grow
    x = _planted(100)
    x[50:90] = x[50]
    a, b, _ = find_pairs(x, 0.95, k=4, progress=False)
    big = {(int(i), int(j)) for i, j in zip(a, b) if i >= 50 and j < 90}
    assert len(big) == 40 * 39 // 2
    groups = connected_groups(len(x), a, b)
    assert sorted(len(g) for g in groups) == [2, 3, 40]


def test_find_pairs_ivf_path_recovers_planted_pairs():
    # the approximate (IVF over PCA) path, with exact re-scored scores, forced at a small size
    x = _planted(3000, 256)
    a, b, s = find_pairs(x, 0.9, factory="PCA32,IVF16,Flat", nprobe=4, progress=False)
    assert {(0, 1), (0, 2), (1, 2), (3, 4)} <= {(int(i), int(j)) for i, j in zip(a, b)}
    exact = np.einsum("ij,ij->i", x[a], x[b])
    np.testing.assert_allclose(s, exact, atol=1e-5)


def test_connected_groups_chains_and_singletons():
    groups = connected_groups(10, np.array([0, 1, 7, 5]), np.array([1, 2, 8, 2]))
    assert [g.tolist() for g in groups] == [[0, 1, 2, 5], [7, 8]]
    assert connected_groups(5, np.zeros(0, int), np.zeros(0, int)) == []


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), "high"])
def test_threshold_validation(bad):
    with pytest.raises(ConfigError, match="threshold"):
        check_threshold(bad)
    with pytest.raises(ConfigError, match="threshold"):
        group_duplicates(_planted(10), [str(i) for i in range(10)], [f"{i}.jpg" for i in range(10)],
                         threshold=bad, progress=False)


def test_cli_refuses_bad_threshold(tmp_path, capsys):
    assert cli_main(["dedup", str(tmp_path), "--threshold", "1.2"]) == 1
    assert "threshold" in capsys.readouterr().err


def test_to_remove_keeps_largest_and_reports(tmp_path):
    x = _planted(20)
    ids = [f"img{i}" for i in range(20)]
    paths = [str(tmp_path / f"img{i}.jpg") for i in range(20)]
    sizes = [{"width": 100, "height": 100, "bytes": 1000} for _ in range(20)]
    sizes[2] = {"width": 400, "height": 300, "bytes": 500}      # the largest of group {0, 1, 2}
    sizes[4] = {"width": 100, "height": 100, "bytes": 5000}     # same pixels as 3: the larger file wins
    res = group_duplicates(x, ids, paths, threshold=0.9, sizes=sizes, progress=False)
    assert [sorted(g.ids) for g in res.groups] == [["img0", "img1", "img2"], ["img3", "img4"]]
    assert [g.keep for g in res.groups] == ["img2", "img4"]
    assert sorted(res.to_remove()) == sorted([paths[0], paths[1], paths[3]])
    assert "img7" not in res.group_of()

    js = write_json(res, tmp_path / "groups.json")
    data = json.loads(js.read_text())
    assert data["n_groups"] == 2 and data["n_duplicates"] == 3 and sorted(data["to_remove"]) == sorted(res.to_remove())
    assert data["groups"][0]["members"][0]["id"] == "img2"
    page = write_html(res, tmp_path / "report.html", thumbnails=False).read_text()
    assert "group-0" in page and "group-1" in page and "keep: img2" in page and "remove: img0" in page


# ---------------------------------------------------------------- real photos, the real tiny model
def _real_set(minidev_dir: Path, root: Path, n: int = 6) -> dict[str, str]:
    """n unrelated real photos + planted copies: exact, half size, JPEG q15, 80 % crop."""
    jpgs = sorted((minidev_dir / "minidev" / "jpg").glob("*.jpg"))
    picked = [p for p in jpgs if "distractor" in p.name][:n]
    assert len(picked) == n
    root.mkdir()
    for p in picked:
        shutil.copyfile(p, root / p.name)
    im = Image.open(picked[0]).convert("RGB")
    w, h = im.size
    shutil.copyfile(picked[0], root / "copy_exact.jpg")
    im.resize((w // 2, h // 2), Image.LANCZOS).save(root / "copy_small.jpg", quality=90)
    Image.open(picked[1]).convert("RGB").save(root / "copy_q15.jpg", quality=15)
    im2 = Image.open(picked[2]).convert("RGB")
    w2, h2 = im2.size
    im2.crop((w2 // 10, h2 // 10, w2 - w2 // 10, h2 - h2 // 10)).save(root / "copy_crop.jpg", quality=90)
    return {"orig0": picked[0].stem, "orig1": picked[1].stem, "orig2": picked[2].stem}


def test_find_duplicates_real_photos(minidev_dir, tmp_path):
    import irkit
    from irkit.models.registry import build_model

    names = _real_set(minidev_dir, tmp_path / "photos")
    model = build_model("effnetlite0-gem", max_side=192)
    res = irkit.find_duplicates(tmp_path / "photos", store=tmp_path / "store", model=model, progress=False)
    groups = sorted(sorted(g.ids) for g in res.groups)
    copies = sorted([sorted([names["orig0"], "copy_exact", "copy_small"]), sorted([names["orig1"], "copy_q15"])])
    # a tight 80 % crop of a close-up (cosine ~0.83 with this tiny model) stays under 0.9; nothing unrelated joins
    assert groups == copies
    by_keep = {g.keep for g in res.groups}
    # the full-size original beats its half-size copy; the q15 copy has the same pixels but a smaller file
    assert names["orig1"] in by_keep and "copy_small" not in by_keep
    assert res.n_images == 10

    # a re-run reuses the store; spatial verification of the band [0.8, 1.0) rescues the crop
    # (hundreds of SIFT matches, nearly all on one similarity transform) and keeps unrelated photos apart
    res2 = irkit.find_duplicates(tmp_path / "photos", store=tmp_path / "store", model=model, progress=False,
                                 verify=True, margin=0.1)
    assert sorted(sorted(g.ids) for g in res2.groups) == sorted(copies + [sorted([names["orig2"], "copy_crop"])])
    crop_pair = [p for g in res2.groups for p in g.pairs if "copy_crop" in (p["a"], p["b"])]
    assert crop_pair[0]["inliers"] >= 0.9 * crop_pair[0]["matches"] >= 8 and crop_pair[0]["score"] < 0.9


def test_cli_dedup_writes_reports(minidev_dir, tmp_path, capsys):
    names = _real_set(minidev_dir, tmp_path / "photos", n=3)  # 7 images: the model runs at full size here
    out = tmp_path / "out" / "report.html"
    rc = cli_main(["dedup", str(tmp_path / "photos"), "-o", str(out), "--to-remove", "--model", "effnetlite0-gem"])
    assert rc == 0
    removed = capsys.readouterr().out.split()
    # orig0 and its exact copy tie on pixels and bytes: the smaller id ("copy_exact") is kept
    assert sorted(Path(p).stem for p in removed) == sorted([names["orig0"], "copy_small", "copy_q15"])
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["n_groups"] == 2 and len(data["to_remove"]) == 3
    page = out.read_text()
    assert page.count("<img ") == 5 and "3 images to remove" in page and (out.parent / "report_files").is_dir()
    assert (out.parent / "report_store").is_dir()

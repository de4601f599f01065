"""Cleaning drops planted wrong-class images from a constructed noisy landmark set."""
from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest

from irkit.cli import main as cli_main
from irkit.data.labelled import load_labelled
from irkit.data.synthetic_pairs import ViewConfig, make_textured_scene, random_view
from irkit.errors import ConfigError, DatasetError
from irkit.search.clean import (CleanConfig, candidate_pairs, clean_dataset, connected_components,
                                select_components)

VIEW = ViewConfig(out_size=(180, 240), crop_frac=(0.7, 0.9), max_rotation_deg=10, max_perspective=0.08,
                  occlusion_prob=0.3)


def _save(path, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


def _noisy_set(root, layout="folders"):
    """Classes c0, c1: 4 views of one scene each + 1 planted view of an unrelated scene."""
    truth = {}
    for c in range(2):
        scene = make_textured_scene((240, 320), rng=100 + c)
        intruder = make_textured_scene((240, 320), rng=200 + c)
        imgs = {f"c{c}v{k}": random_view(scene, 10 * c + k, VIEW).image for k in range(4)}
        imgs[f"c{c}bad"] = random_view(intruder, 99 + c, VIEW).image
        truth[f"{c}"] = imgs
    rows = []
    for c, imgs in truth.items():
        for ident, img in imgs.items():
            if layout == "folders":
                _save(root / f"class{c}" / f"{ident}.jpg", img)
            else:
                gid = f"{ident}x"  # GLDv2 ids are alphanumeric, 3+ chars
                _save(root / gid[0] / gid[1] / gid[2] / f"{gid}.jpg", img)
                rows.append((gid, c))
    if layout == "csv":
        with open(root / "train.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "url", "landmark_id"])
            for gid, c in rows:
                w.writerow([gid, "", c])
    return truth


def _read_clean(path):
    with open(path, newline="") as fh:
        return {r["landmark_id"]: r["images"].split() for r in csv.DictReader(fh)}


def test_clean_folder_layout_drops_planted(tmp_path):
    _noisy_set(tmp_path / "in")
    data = load_labelled(tmp_path / "in")
    assert data.class_names == ["class0", "class1"]
    out = tmp_path / "out"
    summary = clean_dataset(data, out, CleanConfig(min_inliers=15), progress=False)
    kept = _read_clean(out / "train_clean.csv")
    assert kept == {"class0": [f"c0v{k}" for k in range(4)], "class1": [f"c1v{k}" for k in range(4)]}
    assert summary["dropped"] == 2 and summary["kept"] == 8
    report = (out / "report.html").read_text()
    assert "c0bad" in report and "class1" in report
    thumbs = sorted(p.name for p in (out / "thumbs").rglob("*.jpg"))
    assert thumbs == ["c0bad.jpg", "c1bad.jpg"]
    thumb = cv2.imread(str(next((out / "thumbs").rglob("c0bad.jpg"))))
    assert max(thumb.shape[:2]) <= 128
    per_class = [json.loads(p.read_text()) for p in (out / "classes").glob("*.json")]
    boxes = per_class[0]["result"]["boxes"]
    assert len(boxes) == 4 and all(b[0] < b[2] and b[1] < b[3] for b in boxes.values())

    # resumable: a second run reuses per-class results (no re-verification)
    import irkit.search.clean as clean_mod

    def boom(*a, **k):
        raise AssertionError("class was recomputed")

    orig = clean_mod.clean_class
    clean_mod.clean_class = boom
    try:
        again = clean_dataset(data, out, CleanConfig(min_inliers=15), progress=False)
    finally:
        clean_mod.clean_class = orig
    assert again["kept"] == 8


def test_clean_gldv2_csv_with_descriptors_and_cli(tmp_path, capsys):
    truth = _noisy_set(tmp_path, layout="csv")
    data = load_labelled(tmp_path / "train.csv")
    assert data.class_names == ["0", "1"] and len(data.paths) == 10
    # precomputed "global descriptors": one direction per scene + noise -> shortlist of 2 per image
    rng = np.random.default_rng(0)
    desc = {}
    for c, imgs in truth.items():
        for ident in imgs:
            base = np.eye(8)[int(c) * 2 + (ident.endswith("bad"))]
            desc[f"{ident}x"] = base + 0.05 * rng.normal(size=8)
    clean_dataset(data, tmp_path / "o1", CleanConfig(shortlist=2), descriptors=desc, progress=False)
    assert _read_clean(tmp_path / "o1" / "train_clean.csv") == {
        "0": [f"c0v{k}x" for k in range(4)], "1": [f"c1v{k}x" for k in range(4)]}
    calls = []

    def descriptor_fn(paths):
        calls.append(len(paths))
        return np.stack([desc[p.stem] for p in paths])

    clean_dataset(data, tmp_path / "o2", CleanConfig(shortlist=2), descriptor_fn=descriptor_fn, progress=False)
    assert calls == [5, 5]

    rc = cli_main(["clean", str(tmp_path / "train.csv"), "-o", str(tmp_path / "o3"), "--keep", "min-size:1"])
    assert rc == 0
    assert "kept 10 of 10" in capsys.readouterr().out  # min-size:1 keeps every component
    assert cli_main(["clean", str(tmp_path / "train.csv"), "-o", str(tmp_path / "o4"), "--keep", "biggest"]) == 1
    assert "invalid --keep" in capsys.readouterr().err


def test_graph_helpers():
    comps = connected_components(6, [(0, 1), (1, 2), (4, 5)])
    assert comps == [[0, 1, 2], [4, 5], [3]]
    assert select_components(comps, "largest") == [0, 1, 2]
    assert select_components(comps, "min-size:2") == [0, 1, 2, 4, 5]
    assert select_components([[0], [1]], "largest") == []
    with pytest.raises(ConfigError):
        select_components(comps, "min-size:0")
    rng = np.random.default_rng(0)
    assert len(candidate_pairs(5, None, 2, 40, rng)) == 10  # small class: all pairs
    big = candidate_pairs(50, None, 3, 40, rng)  # large class: random shortlist
    assert all(a < b for a, b in big) and 50 * 3 / 2 <= len(big) <= 150
    d = np.eye(4)[[0, 0, 1, 1]].astype(np.float32)
    assert candidate_pairs(4, d, 1, 40, rng) == [(0, 1), (2, 3)]


def test_bad_inputs(tmp_path):
    with pytest.raises(DatasetError):
        load_labelled(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError):
        load_labelled(tmp_path / "empty")


def test_unreadable_images_are_reported_not_fatal(tmp_path):
    scene = make_textured_scene((240, 320), rng=7)
    for k in range(3):
        _save(tmp_path / "in" / "lm" / f"v{k}.jpg", random_view(scene, k, VIEW).image)
    (tmp_path / "in" / "lm" / "broken.jpg").write_bytes(b"not a jpeg")
    seen = []

    def descriptor_fn(paths):
        seen.extend(p.name for p in paths)
        return np.ones((len(paths), 4))

    summary = clean_dataset(load_labelled(tmp_path / "in"), tmp_path / "out", descriptor_fn=descriptor_fn,
                            progress=False)
    assert sorted(seen) == ["v0.jpg", "v1.jpg", "v2.jpg"]
    assert summary["unreadable"] == 1 and summary["kept"] == 3
    assert "broken" in (tmp_path / "out" / "report.html").read_text()


def test_ids_must_be_unique_and_without_spaces(tmp_path):
    """Ids go into train_clean.csv: a name shared by two classes, or one with a space, is refused up front."""
    for c in ("a", "b"):
        _save(tmp_path / "dup" / c / "same.jpg", make_textured_scene((96, 96), rng=1))
    with pytest.raises(DatasetError, match="appears twice"):
        clean_dataset(load_labelled(tmp_path / "dup"), tmp_path / "o1", progress=False)
    _save(tmp_path / "sp" / "a" / "has space.jpg", make_textured_scene((96, 96), rng=1))
    with pytest.raises(DatasetError, match="spaces"):
        clean_dataset(load_labelled(tmp_path / "sp"), tmp_path / "o2", progress=False)

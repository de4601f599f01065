"""Synthetic pairs: the homography says where source points land in the view; seeds reproduce."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from irkit.data.photo_sources import MINIDEV_OPENCV_SOURCES, SOURCES, locate_photo_pool, minidev_exclusions
from irkit.data.synthetic_pairs import (SyntheticPairDataset, ViewConfig, make_textured_scene, overlap_box,
                                        photo_pool, random_view)
from irkit.errors import DatasetError

NO_PHOTOMETRIC = dict(brightness=0, contrast=0, saturation=0, hue=0, blur_prob=0, occlusion_prob=0)


def _marker_image(h=300, w=400, at=(150, 120)) -> np.ndarray:
    img = np.full((h, w, 3), 40, np.uint8)
    cv2.circle(img, at, 6, (255, 0, 0), -1)  # a red disc on a dark background
    return img


@pytest.mark.parametrize("seed", range(6))
def test_homography_maps_marker_to_view(seed):
    x, y = 200, 150
    img = _marker_image(at=(x, y))
    cfg = ViewConfig(crop_frac=(0.8, 0.95), **NO_PHOTOMETRIC)
    view = random_view(img, seed, cfg)
    p = view.homography @ np.array([x, y, 1.0])
    px, py = p[:2] / p[2]
    red = (view.image[..., 0] > 150) & (view.image[..., 1] < 100)
    ys, xs = np.nonzero(red)
    assert len(xs) > 10, "marker must stay inside the view"
    assert abs(xs.mean() - px) < 1.5 and abs(ys.mean() - py) < 1.5


def test_homography_with_photometric_changes():
    """With jitter, blur and occluders the geometry is unchanged where nothing is occluded."""
    img = make_textured_scene((240, 320), rng=5)
    cfg = ViewConfig(out_size=(200, 260), occlusion_prob=1.0)
    view = random_view(img, 7, cfg)
    assert view.image.shape == (200, 260, 3) and view.image.dtype == np.uint8
    assert view.occluded.shape == (200, 260) and view.occluded.any()
    clean = random_view(img, 7, ViewConfig(out_size=(200, 260), **NO_PHOTOMETRIC))
    assert np.allclose(clean.homography, view.homography)  # same draws for the geometry
    expected = cv2.warpPerspective(img, view.homography, (260, 200))
    diff = np.abs(expected.astype(int) - clean.image.astype(int)).mean()
    assert diff < 1.0


def test_determinism_and_variety():
    img = make_textured_scene((200, 260), rng=1)
    a, b = random_view(img, 123), random_view(img, 123)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.homography, b.homography)
    c = random_view(img, np.random.default_rng(124))
    assert not np.array_equal(a.homography, c.homography)


def test_overlap_box_of_a_plain_crop():
    # pure crop x in [50, 249], y in [20, 119] scaled by 1: H = translation
    h = np.array([[1, 0, -50], [0, 1, -20], [0, 0, 1]], float)
    assert overlap_box(h, (100, 200), (300, 400)) == pytest.approx((50, 20, 249, 119))
    # a view bigger than the source is clipped to the source
    assert overlap_box(np.eye(3), (500, 500), (300, 400)) == pytest.approx((0, 0, 399, 299))
    v = random_view(make_textured_scene((200, 260), rng=2), 3)
    x1, y1, x2, y2 = overlap_box(v.homography, v.image.shape[:2], (200, 260))
    assert 0 <= x1 < x2 <= 259 and 0 <= y1 < y2 <= 199


def _write_pool(root, n=4):
    for i in range(n):
        img = make_textured_scene((60, 80), rng=i, n_shapes=20)
        sub = root / ("sub" if i % 2 else "")
        sub.mkdir(exist_ok=True)
        cv2.imwrite(str(sub / f"p{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    (root / "distractor_apple.jpg").write_bytes(b"x")
    (root / "notes.txt").write_text("not an image")


def test_photo_pool_recursive_with_exclusions(tmp_path):
    _write_pool(tmp_path)
    pool = photo_pool(tmp_path, exclude=["distractor_*", "p3"])
    assert [p.name for p in pool] == ["p0.png", "p2.png", "p1.png"]  # sorted by path: root files first
    with pytest.raises(DatasetError):
        photo_pool(tmp_path / "missing")
    with pytest.raises(DatasetError):
        photo_pool(tmp_path, exclude=["*"])


def test_dataset_pairs_and_negatives(tmp_path):
    _write_pool(tmp_path)
    paths = photo_pool(tmp_path, exclude=["distractor_*"])

    ds = SyntheticPairDataset(paths, size=(48, 64), seed=3)
    a, p, label = ds[1]
    assert a.shape == p.shape == (3, 48, 64) and a.dtype == torch.float32 and label == 1
    assert 0 <= float(a.min()) and float(a.max()) <= 1
    a2, p2, _ = ds[1]
    assert torch.equal(p, p2)
    ds.set_epoch(1)
    assert not torch.equal(ds[1][1], p)
    dsn = SyntheticPairDataset(paths, size=(48, 64), n_negatives=2, seed=3, return_homography=True)
    a, p, negs, hmat = dsn[0]
    assert negs.shape == (2, 3, 48, 64) and hmat.shape == (3, 3)
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    batch = next(iter(loader))
    assert batch[0].shape == (2, 3, 48, 64)


def test_photo_sources_never_include_minidev(tmp_path):
    names = minidev_exclusions()
    for n in ("box", "messi5", "graf*", "ela_modified"):
        assert n in names
    for src in SOURCES.values():
        for f in src.files:
            stem = f.rsplit(".", 1)[0]
            assert stem not in MINIDEV_OPENCV_SOURCES
    try:
        pool = locate_photo_pool()
    except DatasetError as exc:
        assert "install" in str(exc)
    else:
        assert all(p.is_file() for p in pool) and len(pool) >= 2
    with pytest.raises(DatasetError):
        locate_photo_pool(["nope"])


def test_minidev_exclusions_from_gnd(minidev_dir):
    names = minidev_exclusions(minidev_dir / "minidev" / "gnd_minidev.pkl")
    assert "baboon" in names and "distractor_distractors_baboon" in names

"""Spatial verification: recovers known geometry, rejects unrelated images, selects strong positions."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from irkit.data.synthetic_pairs import make_textured_scene
from irkit.errors import ConfigError
from irkit.search.spatial import (LocalFeatures, SpatialVerifier, apply_homography, backbone_features,
                                  match_descriptors, score_candidates, sift_features)

H, W = 360, 480


def _true_h() -> np.ndarray:
    """Rotation 12 deg, scale 0.85, translation and a mild perspective term."""
    a = np.deg2rad(12)
    m = np.array([[0.85 * np.cos(a), -0.85 * np.sin(a), 60.0],
                  [0.85 * np.sin(a), 0.85 * np.cos(a), 10.0],
                  [1.5e-4, -1e-4, 1.0]])
    return m


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    return make_textured_scene((H, W), rng=11)


@pytest.fixture(scope="module")
def warped(scene) -> np.ndarray:
    return cv2.warpPerspective(scene, _true_h(), (W, H), flags=cv2.INTER_LINEAR)


def _corner_error(est: np.ndarray, true: np.ndarray) -> float:
    corners = np.array([[0, 0], [W - 1, 0], [W - 1, H - 1], [0, H - 1]], float)
    return float(np.abs(apply_homography(est, corners) - apply_homography(true, corners)).max())


def test_recovers_known_homography(scene, warped):
    v = SpatialVerifier(max_features=800, max_side=None)
    res = v.verify(v.features(scene), v.features(warped))
    assert res.inliers >= 60, res
    assert res.n_matches >= res.inliers and res.inlier_mask.sum() == res.inliers
    assert res.model.shape == (3, 3)
    assert _corner_error(res.model, _true_h()) < 3.0


def test_max_side_keypoints_in_original_pixels(scene, warped):
    """Features extracted on a shrunk copy still give H in original pixels."""
    v = SpatialVerifier(max_features=800, max_side=320)
    fq = v.features(scene)
    assert fq.image_size == (H, W) and fq.keypoints[:, 0].max() > 320
    res = v.verify(fq, v.features(warped))
    assert res.inliers >= 30
    assert _corner_error(res.model, _true_h()) < 6.0


def test_similarity_and_affine_models(scene):
    a = np.deg2rad(-20)
    m = np.array([[0.9 * np.cos(a), -0.9 * np.sin(a), 80.0], [0.9 * np.sin(a), 0.9 * np.cos(a), 60.0]])
    view = cv2.warpAffine(scene, m, (W, H))
    true = np.vstack([m, [0, 0, 1]])
    for model in ("similarity", "affine"):
        v = SpatialVerifier(max_side=None, model=model)
        res = v.verify(v.features(scene), v.features(view))
        assert res.inliers >= 60 and np.allclose(res.model[2], [0, 0, 1])
        assert _corner_error(res.model, true) < 3.0


def test_unrelated_images_have_few_inliers(scene, warped):
    v = SpatialVerifier(max_side=None)
    fq = v.features(scene)
    others = [v.features(make_textured_scene((H, W), rng=s)) for s in (101, 102, 103)]
    scores = score_candidates(fq, [v.features(warped)] + others, verifier=v)
    assert scores.dtype == np.float32 and scores.shape == (4,)
    assert scores[0] >= 60
    assert scores[1:].max() <= 12, scores


def test_real_photo_if_available():
    skimage_data = pytest.importorskip("skimage.data")
    img = np.ascontiguousarray(skimage_data.coffee())  # CC0, not part of minidev
    h, w = img.shape[:2]
    true = np.array([[0.9, 0.08, 20.0], [-0.06, 0.92, 15.0], [1e-4, 5e-5, 1.0]])
    view = cv2.warpPerspective(img, true, (w, h))
    v = SpatialVerifier(max_side=None)
    res = v.verify(v.features(img), v.features(view))
    assert res.inliers >= 40
    corners = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], float)
    assert np.abs(apply_homography(res.model, corners) - apply_homography(true, corners)).max() < 4.0


def test_backbone_features_pick_strongest_positions():
    rng = np.random.default_rng(0)
    fmap = rng.normal(0, 0.1, size=(8, 6, 7)).astype(np.float32)
    strong = [(1, 2, 5.0), (4, 6, 4.0), (0, 0, 3.0)]  # (row, col, magnitude)
    for r, c, m in strong:
        fmap[:, r, c] = m
    f = backbone_features(torch.from_numpy(fmap), n=3, stride=16)
    assert len(f) == 3
    got = [(int(round((y + 0.5) / 16 - 0.5)), int(round((x + 0.5) / 16 - 0.5))) for x, y in f.keypoints]
    assert got == [(r, c) for r, c, _ in strong]
    # centres of the stride-16 cells in pixel-centre coordinates
    assert np.allclose(f.keypoints[0], [(2 + 0.5) * 16 - 0.5, (1 + 0.5) * 16 - 0.5])
    assert np.allclose(np.linalg.norm(f.descriptors, axis=1), 1.0)
    assert np.all(np.diff(f.scores) <= 0)
    assert f.image_size == (6 * 16, 7 * 16)
    # L1 strength differs from L2: one big channel beats a spread-out activation in L2 only
    fm = np.zeros((4, 1, 2), np.float32)
    fm[:, 0, 0] = 1.0           # L2 = 2, L1 = 4
    fm[0, 0, 1] = 3.0           # L2 = 3, L1 = 3
    assert backbone_features(fm, n=1, norm="l2").keypoints[0, 0] == pytest.approx(16 + 7.5)
    assert backbone_features(fm, n=1, norm="l1").keypoints[0, 0] == pytest.approx(7.5)
    with pytest.raises(ConfigError):
        backbone_features(np.zeros((3, 4)), n=2)


def test_backbone_features_verify_shifted_maps():
    """The same map shifted by 3 cells verifies with a translation of 3 strides."""
    rng = np.random.default_rng(1)
    big = rng.normal(size=(32, 20, 20)).astype(np.float32)
    a, b = big[:, :, :16], big[:, :, 3:19]
    v = SpatialVerifier(kind="backbone", max_features=200, stride=8, model="similarity", reproj_threshold=2.0)
    res = v.verify(v.features_from_map(a), v.features_from_map(b))
    assert res.inliers >= 100
    assert np.allclose(res.model[:2, 2], [-24.0, 0.0], atol=0.5)
    with pytest.raises(ConfigError):
        v.features(np.zeros((8, 8, 3), np.uint8))


def test_match_descriptors_mutual_and_ratio():
    q = np.array([[1, 0, 0], [0, 1, 0], [0.7, 0.7, 0]], np.float32)
    d = np.array([[1, 0.05, 0], [0, 1, 0.02], [0, 0, 1]], np.float32)
    m = match_descriptors(q, d, ratio=None, mutual=True)
    assert m.tolist() == [[0, 0], [1, 1]]  # q2 is ambiguous: its NN (d0 or d1) prefers another
    m = match_descriptors(q, d, ratio=0.8, mutual=False)
    assert [0, 0] in m.tolist() and [1, 1] in m.tolist() and all(r[0] != 2 for r in m.tolist())
    assert match_descriptors(q[:0], d).shape == (0, 2)
    assert match_descriptors(q, d[:1], ratio=0.8, mutual=False).shape == (3, 2)  # ratio needs 2 neighbours


def test_cache_and_roundtrip(tmp_path, scene):
    v = SpatialVerifier(max_side=None, cache_size=2)
    f1 = v.features(scene, key="a")
    assert v.features(np.zeros((10, 10, 3), np.uint8), key="a") is f1  # served from the cache
    v.features(scene, key="b"), v.features(scene, key="c")
    assert v.features(np.zeros((10, 10, 3), np.uint8), key="a") is not f1  # evicted (LRU of 2)
    f1.save(tmp_path / "f.npz")
    g = LocalFeatures.load(tmp_path / "f.npz")
    assert np.array_equal(g.keypoints, f1.keypoints) and np.array_equal(g.descriptors, f1.descriptors)
    assert g.image_size == f1.image_size


def test_features_from_path(tmp_path, scene):
    path = tmp_path / "s.png"
    cv2.imwrite(str(path), cv2.cvtColor(scene, cv2.COLOR_RGB2BGR))
    v = SpatialVerifier(max_side=None)
    f = v.features(path)
    assert v.features(str(path)) is f
    assert len(f) == len(sift_features(scene, 1000))


def test_too_few_matches_gives_zero():
    v = SpatialVerifier()
    empty = LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), (10, 10))
    res = v.verify(empty, empty)
    assert res.inliers == 0 and res.model is None and res.n_matches == 0
    three = LocalFeatures(np.eye(3, 2, dtype=np.float32) * 10, np.eye(3, 128, dtype=np.float32), (10, 10))
    assert v.verify(three, three).inliers == 0  # a homography needs 4 points

"""Classic spatial verification: local features, mutual-NN + ratio matching, RANSAC geometry.

This is the re-ranking baseline every retrieval paper compares against (Philbin et al. 2007 and
successors): two images show the same object when many local correspondences agree with one
geometric transformation, and the number of those inliers is the score.

Two kinds of local features are supported:

* SIFT through OpenCV (``sift_features``);
* "backbone features selected by activation strength" (``backbone_features``): the N positions of
  a CNN feature map [C,h,w] with the largest activation norm, as in DELF/CFCD-style local stages.
  This lets the same verifier run on the re-rank maps the FeatureStore keeps.

Coordinates follow OpenCV's convention (pixel centres at integer coordinates) and are always in the
pixels of the image given to ``features`` (after EXIF, before any internal ``max_side`` resize), so
the estimated model maps query pixels to database pixels and the RANSAC threshold is in those
pixels.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, Sequence

import cv2
import numpy as np
import torch

from irkit.errors import ConfigError, ImageError
from irkit.io.images import crop_bbx, load_image
from irkit.utils import atomic_path

log = logging.getLogger(__name__)

GEOMETRY_MODELS = ("homography", "affine", "similarity")
_MIN_POINTS = {"homography": 4, "affine": 3, "similarity": 2}


@dataclass
class LocalFeatures:
    """Local features of one image.

    keypoints: float32 [N,2] (x, y) in pixels of the original image;
    descriptors: float32 [N,D]; scores: float32 [N] (SIFT response or activation norm);
    image_size: (height, width) of the original image.
    """

    keypoints: np.ndarray
    descriptors: np.ndarray
    image_size: tuple[int, int]
    scores: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.keypoints.shape[0])

    def save(self, path: str | os.PathLike) -> None:
        """Write to an ``.npz`` file atomically (so features can be cached on disk)."""
        arrays = {"keypoints": self.keypoints, "descriptors": self.descriptors,
                  "image_size": np.asarray(self.image_size, dtype=np.int64)}
        if self.scores is not None:
            arrays["scores"] = self.scores
        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LocalFeatures":
        with np.load(path) as z:
            return cls(keypoints=z["keypoints"], descriptors=z["descriptors"],
                       image_size=tuple(int(v) for v in z["image_size"]),
                       scores=z["scores"] if "scores" in z.files else None)


@dataclass
class VerificationResult:
    """Outcome of verifying one pair.

    inliers: number of matches consistent with the model (the score);
    model: 3x3 float64 matrix mapping query pixels to database pixels (affine models are lifted to
    3x3), or None when no model could be fitted; inlier_mask: bool [n_matches];
    matches: int [n_matches, 2] (query index, database index).
    """

    inliers: int
    model: np.ndarray | None
    inlier_mask: np.ndarray
    n_matches: int
    matches: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))


# --------------------------------------------------------------------------------------------
# local features
# --------------------------------------------------------------------------------------------
def _check_image(img: np.ndarray) -> None:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise ImageError("expected a uint8 image array HxW or HxWx3 (RGB); load files with irkit.io.images.load_image")
    if img.ndim == 3 and img.shape[2] != 3:
        raise ImageError(f"expected 3 channels (RGB), got shape {img.shape}")


def sift_features(img: np.ndarray, max_features: int = 1000, max_side: int | None = None,
                  root_sift: bool = False) -> LocalFeatures:
    """SIFT keypoints and descriptors of a uint8 RGB (or grey) image.

    ``max_side`` shrinks the image before detection (speed; SIFT is scale invariant) and the
    keypoints are mapped back to original pixels. ``root_sift`` applies the RootSIFT mapping
    (L1-normalise, square root), which makes Euclidean matching compare Hellinger distances.
    Keeps the ``max_features`` strongest responses.
    """
    _check_image(img)
    if max_features < 1:
        raise ConfigError(f"max_features must be >= 1, got {max_features}")
    h, w = img.shape[:2]
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if img.ndim == 3 else img
    scale = 1.0
    if max_side is not None and max(h, w) > max_side:
        scale = max_side / max(h, w)
        grey = cv2.resize(grey, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    sift = cv2.SIFT_create(nfeatures=max_features)
    kps, desc = sift.detectAndCompute(grey, None)
    if desc is None or not kps:
        return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), (h, w),
                             np.zeros((0,), np.float32))
    # OpenCV may return a few more than nfeatures (ties); keep the strongest
    resp = np.array([k.response for k in kps], dtype=np.float32)
    order = np.argsort(-resp, kind="stable")[:max_features]
    pts = np.array([kps[i].pt for i in order], dtype=np.float32)
    if scale != 1.0:
        # pixel-centre convention: x_orig + 0.5 = (x_small + 0.5) / scale
        pts = (pts + 0.5) / scale - 0.5
    desc = desc[order].astype(np.float32)
    if root_sift:
        desc = desc / np.maximum(np.abs(desc).sum(axis=1, keepdims=True), 1e-12)
        desc = np.sqrt(desc)
    return LocalFeatures(pts, desc, (h, w), resp[order])


def backbone_features(feature_map: np.ndarray | torch.Tensor, n: int = 512, stride: float = 16.0,
                      norm: str = "l2", image_size: tuple[int, int] | None = None) -> LocalFeatures:
    """Local features from a CNN feature map [C,h,w]: the ``n`` positions with the strongest activation.

    Strength is the L2 (or L1, ``norm="l1"``, as CFCD's attention) norm of each position's
    activation vector; descriptors are the L2-normalised activation vectors. Keypoints are the
    centres of the selected positions mapped to image pixels: ``x = (j + 0.5) * stride - 0.5``
    (position j covers pixels [j*stride, (j+1)*stride)). ``image_size`` (h, w) defaults to
    ``(h*stride, w*stride)``. Ties are broken by position order (stable).
    """
    if isinstance(feature_map, torch.Tensor):
        feature_map = feature_map.detach().to("cpu", torch.float32).numpy()
    fmap = np.asarray(feature_map, dtype=np.float32)
    if fmap.ndim == 4 and fmap.shape[0] == 1:
        fmap = fmap[0]
    if fmap.ndim != 3:
        raise ConfigError(f"expected a feature map [C,h,w], got shape {fmap.shape}")
    if norm not in ("l1", "l2"):
        raise ConfigError(f"norm must be 'l1' or 'l2', got {norm!r}")
    if n < 1 or stride <= 0:
        raise ConfigError(f"need n >= 1 and stride > 0, got n={n}, stride={stride}")
    c, h, w = fmap.shape
    flat = fmap.reshape(c, h * w).T  # [h*w, C]
    strength = np.abs(flat).sum(1) if norm == "l1" else np.sqrt((flat * flat).sum(1))
    order = np.argsort(-strength, kind="stable")[: min(n, h * w)]
    desc = flat[order]
    desc = desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)
    rows, cols = np.divmod(order, w)
    pts = np.stack([(cols + 0.5) * stride - 0.5, (rows + 0.5) * stride - 0.5], axis=1).astype(np.float32)
    size = image_size if image_size is not None else (int(round(h * stride)), int(round(w * stride)))
    return LocalFeatures(pts, np.ascontiguousarray(desc, dtype=np.float32), (int(size[0]), int(size[1])),
                         strength[order].astype(np.float32))


# --------------------------------------------------------------------------------------------
# matching
# --------------------------------------------------------------------------------------------
def _l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def match_descriptors(desc_q: np.ndarray, desc_db: np.ndarray, ratio: float | None = 0.8,
                      mutual: bool = True, normalize: bool = True) -> np.ndarray:
    """Tentative correspondences: nearest neighbours in Euclidean distance, filtered.

    ``ratio``: Lowe's test, keep a match when d(nearest) < ratio * d(second nearest) (None or
    >= 1 disables it; with a single database descriptor it always passes). ``mutual``: keep only
    pairs that are each other's nearest neighbour. ``normalize``: L2-normalise the descriptors
    first. Returns int64 [M,2] of (query index, database index), sorted by query index.
    """
    if desc_q.shape[0] == 0 or desc_db.shape[0] == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if desc_q.shape[1] != desc_db.shape[1]:
        raise ConfigError(f"descriptor sizes differ: {desc_q.shape[1]} vs {desc_db.shape[1]}")
    a = desc_q.astype(np.float32)
    b = desc_db.astype(np.float32)
    if normalize:
        a, b = _l2n(a), _l2n(b)
    # squared distances via the dot product (torch matmul is much faster than numpy's here)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    d2 = (ta * ta).sum(1, keepdim=True) + (tb * tb).sum(1)[None, :] - 2.0 * ta @ tb.T
    d2.clamp_(min=0.0)
    k = 2 if b.shape[0] >= 2 else 1
    vals, idx = torch.topk(d2, k, dim=1, largest=False)
    nn12 = idx[:, 0].numpy()
    keep = np.ones(a.shape[0], dtype=bool)
    if ratio is not None and ratio < 1.0 and k == 2:
        d = vals.sqrt().numpy()
        keep &= d[:, 0] < ratio * d[:, 1]
    if mutual:
        nn21 = torch.argmin(d2, dim=0).numpy()
        keep &= nn21[nn12] == np.arange(a.shape[0])
    qi = np.nonzero(keep)[0]
    return np.stack([qi, nn12[qi]], axis=1).astype(np.int64)


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------
def _model_is_sane(m: np.ndarray, max_scale_change: float | None) -> bool:
    """Reject degenerate fits (collapsed or exploding maps), which RANSAC accepts on clustered matches."""
    if not np.all(np.isfinite(m)):
        return False
    if max_scale_change is None:
        return True
    det = float(np.linalg.det(m[:2, :2] / m[2, 2])) if m[2, 2] != 0 else 0.0
    lo, hi = 1.0 / max_scale_change ** 2, max_scale_change ** 2
    return lo <= abs(det) <= hi


def estimate_geometry(pts_q: np.ndarray, pts_db: np.ndarray, model: str = "homography",
                      reproj_threshold: float = 8.0, max_iters: int = 2000, confidence: float = 0.999,
                      max_scale_change: float | None = 10.0) -> tuple[np.ndarray | None, np.ndarray]:
    """Fit ``model`` with RANSAC to corresponding points [M,2] (query -> database).

    model: "homography" (cv2.findHomography), "affine" (cv2.estimateAffine2D) or "similarity"
    (cv2.estimateAffinePartial2D: rotation, uniform scale, translation). ``reproj_threshold`` is in
    pixels. ``max_scale_change`` rejects fits whose local area change exceeds its square (None
    disables the check). Returns (3x3 model or None, bool inlier mask [M]).
    """
    if model not in GEOMETRY_MODELS:
        raise ConfigError(f"unknown geometry model {model!r}; choose one of {', '.join(GEOMETRY_MODELS)}")
    m = pts_q.shape[0]
    mask = np.zeros(m, dtype=bool)
    if m < _MIN_POINTS[model]:
        return None, mask
    src = np.ascontiguousarray(pts_q, dtype=np.float32).reshape(-1, 1, 2)
    dst = np.ascontiguousarray(pts_db, dtype=np.float32).reshape(-1, 1, 2)
    if model == "homography":
        mat, inl = cv2.findHomography(src, dst, cv2.RANSAC, reproj_threshold, maxIters=max_iters,
                                      confidence=confidence)
    else:
        fn = cv2.estimateAffine2D if model == "affine" else cv2.estimateAffinePartial2D
        mat, inl = fn(src, dst, method=cv2.RANSAC, ransacReprojThreshold=reproj_threshold,
                      maxIters=max_iters, confidence=confidence)
        if mat is not None:
            mat = np.vstack([mat, [0.0, 0.0, 1.0]])
    if mat is None or inl is None:
        return None, mask
    mat = np.asarray(mat, dtype=np.float64)
    if not _model_is_sane(mat, max_scale_change):
        return None, mask
    return mat, inl.reshape(-1).astype(bool)


def apply_homography(h: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Map points [N,2] by a 3x3 matrix (projective division included)."""
    p = np.concatenate([np.asarray(pts, np.float64), np.ones((len(pts), 1))], axis=1) @ np.asarray(h, np.float64).T
    return p[:, :2] / p[:, 2:3]


# --------------------------------------------------------------------------------------------
# the verifier
# --------------------------------------------------------------------------------------------
class SpatialVerifier:
    """Spatial verification with one configuration: features, matching and geometry.

    ``features(img, key=...)`` extracts (and caches under ``key``, LRU, ``cache_size`` entries)
    local features; ``verify`` returns the full result of a pair; ``score`` its inlier count;
    ``score_candidates`` scores a query against a list of database images (the re-rank hook).

    kind: "sift" for images; "backbone" features come from ``features_from_map``.
    """

    def __init__(self, kind: str = "sift", max_features: int = 1000, max_side: int | None = 1024,
                 root_sift: bool = True, ratio: float | None = 0.8, mutual: bool = True,
                 normalize: bool = True, model: str = "homography", reproj_threshold: float = 8.0,
                 max_iters: int = 2000, confidence: float = 0.999, max_scale_change: float | None = 10.0,
                 min_inliers: int = 0, cache_size: int = 256, stride: float = 16.0, norm: str = "l2") -> None:
        if kind not in ("sift", "backbone"):
            raise ConfigError(f"unknown local feature kind {kind!r}; use 'sift' or 'backbone'")
        if model not in GEOMETRY_MODELS:
            raise ConfigError(f"unknown geometry model {model!r}; choose one of {', '.join(GEOMETRY_MODELS)}")
        self.kind, self.max_features, self.max_side, self.root_sift = kind, max_features, max_side, root_sift
        self.ratio, self.mutual, self.normalize = ratio, mutual, normalize
        self.model, self.reproj_threshold, self.max_iters = model, reproj_threshold, max_iters
        self.confidence, self.max_scale_change, self.min_inliers = confidence, max_scale_change, min_inliers
        self.stride, self.norm = stride, norm
        self.cache_size = cache_size
        self._cache: OrderedDict[Hashable, LocalFeatures] = OrderedDict()

    # -- features ------------------------------------------------------------------------------
    def _cached(self, key: Hashable | None) -> LocalFeatures | None:
        if key is None or key not in self._cache:
            return None
        self._cache.move_to_end(key)
        return self._cache[key]

    def _remember(self, key: Hashable | None, feats: LocalFeatures) -> LocalFeatures:
        if key is not None and self.cache_size > 0:
            self._cache[key] = feats
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return feats

    def features(self, img: np.ndarray | str | os.PathLike, key: Hashable | None = None) -> LocalFeatures:
        """Local features of an image array or file (a path is also its cache key by default)."""
        if isinstance(img, (str, os.PathLike)):
            key = str(img) if key is None else key
            hit = self._cached(key)
            if hit is not None:
                return hit
            img = load_image(Path(img))
        hit = self._cached(key)
        if hit is not None:
            return hit
        if self.kind != "sift":
            raise ConfigError("this verifier uses backbone features: call features_from_map(feature_map)")
        return self._remember(key, sift_features(img, self.max_features, self.max_side, self.root_sift))

    def features_from_map(self, feature_map: np.ndarray | torch.Tensor, key: Hashable | None = None,
                          image_size: tuple[int, int] | None = None) -> LocalFeatures:
        """Backbone local features of a feature map [C,h,w] (see ``backbone_features``)."""
        hit = self._cached(key)
        if hit is not None:
            return hit
        return self._remember(key, backbone_features(feature_map, self.max_features, self.stride, self.norm, image_size))

    def clear_cache(self) -> None:
        self._cache.clear()

    # -- verification --------------------------------------------------------------------------
    def verify(self, feats_q: LocalFeatures, feats_db: LocalFeatures) -> VerificationResult:
        """Match and fit the geometric model; see ``VerificationResult``."""
        matches = match_descriptors(feats_q.descriptors, feats_db.descriptors, self.ratio, self.mutual, self.normalize)
        n = len(matches)
        if n == 0:
            return VerificationResult(0, None, np.zeros(0, bool), 0, matches)
        mat, mask = estimate_geometry(feats_q.keypoints[matches[:, 0]], feats_db.keypoints[matches[:, 1]],
                                      self.model, self.reproj_threshold, self.max_iters, self.confidence,
                                      self.max_scale_change)
        inl = int(mask.sum())
        if inl < self.min_inliers:
            return VerificationResult(0, None, np.zeros(n, bool), n, matches)
        return VerificationResult(inl, mat, mask, n, matches)

    def score(self, feats_q: LocalFeatures, feats_db: LocalFeatures) -> float:
        """Inlier count of the pair (0 below ``min_inliers``)."""
        return float(self.verify(feats_q, feats_db).inliers)

    def score_candidates(self, query_feats: LocalFeatures, db_feats: Sequence[LocalFeatures]) -> np.ndarray:
        """Scores (inlier counts, float32 [len(db_feats)]) of the query against each candidate."""
        return np.array([self.score(query_feats, f) for f in db_feats], dtype=np.float32)


def score_candidates(query_feats: LocalFeatures, db_feats: Sequence[LocalFeatures],
                     verifier: SpatialVerifier | None = None) -> np.ndarray:
    """Inlier counts of ``query_feats`` against each of ``db_feats`` (float32 [n]).

    The entry point of the shared re-rank pipeline; ``verifier`` defaults to ``SpatialVerifier()``.
    """
    return (verifier or SpatialVerifier()).score_candidates(query_feats, db_feats)


def inlier_box(feats: LocalFeatures, result: VerificationResult, side: str = "db") -> tuple[float, float, float, float] | None:
    """Bounding box [x1,y1,x2,y2] of the inlier keypoints on one side ("query" or "db"), or None.

    Used by cleaning to record where a landmark appears (boxes for region-proposal training).
    """
    if result.inliers == 0:
        return None
    col = 0 if side == "query" else 1
    pts = feats.keypoints[result.matches[result.inlier_mask, col]]
    return (float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max()))


def inlier_score(inliers: np.ndarray | float, floor: float = 10.0, cap: float = 60.0) -> np.ndarray:
    """Inlier counts mapped to [0, 1] for mixing with a cosine similarity: 0 up to ``floor`` (what
    unrelated images reach by chance), rising linearly to 1 at ``cap``."""
    return np.clip((np.asarray(inliers, np.float64) - floor) / (cap - floor), 0.0, 1.0)


class FileSpatialScorer:
    """The re-rank pipeline's scorer for images on disk: query ``j`` is ``query_paths[j]`` (cropped to
    ``query_boxes[j]``) or an image array, candidates are rows of ``db_paths``; score = :func:`inlier_score`.
    Database features are cached for the whole run, since top-k lists of queries overlap."""

    def __init__(self, query_paths: Sequence[str], db_paths: Sequence[str],
                 query_boxes: Sequence[tuple[float, float, float, float] | None] | None = None,
                 verifier: SpatialVerifier | None = None, floor: float = 10.0, cap: float = 60.0) -> None:
        self.query_paths, self.db_paths = list(query_paths), list(db_paths)
        self.query_boxes = list(query_boxes) if query_boxes is not None else [None] * len(self.query_paths)
        self.verifier = verifier or SpatialVerifier(cache_size=len(self.db_paths) + 1)
        self.floor, self.cap = floor, cap

    def _query(self, j: int) -> LocalFeatures:
        img = load_image(self.query_paths[j])
        if self.query_boxes[j] is not None:
            img = crop_bbx(img, self.query_boxes[j])
        return self.verifier.features(img)

    def score(self, query: int | np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """``query``: index into ``query_paths``, or the query image itself (uint8 RGB, already cropped)."""
        fq = self.verifier.features(query) if isinstance(query, np.ndarray) else self._query(int(query))
        inliers = self.verifier.score_candidates(fq, [self.verifier.features(self.db_paths[int(i)]) for i in candidates])
        return inlier_score(inliers, self.floor, self.cap)

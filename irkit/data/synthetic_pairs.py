"""Self-supervised positive pairs from any folder of photos.

A positive "view" of a photo is made by a random bounded homography (crop + scale + rotation +
perspective), then photometric changes (colour jitter, blur) and occluders. Because the
homography is returned, the overlap between the photo and its view is known exactly: it can
supervise local matching, region proposals (``overlap_box``) or spatial verification tests.

Everything is deterministic given a seed or a ``np.random.Generator``; the dataset derives one
generator per (seed, epoch, index), so results do not depend on DataLoader workers.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from irkit.errors import ConfigError, DatasetError, ImageError
from irkit.io.images import IMAGE_EXTENSIONS, load_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ViewConfig:
    """Bounds of the random view.

    crop_frac: side of the source region seen by the view, as a fraction of the source side;
    out_scale: view side relative to the cropped region's side (zoom in > 1, out < 1), ignored when
    ``out_size`` (h, w) is fixed; max_rotation_deg: in-plane rotation; max_perspective: each
    corner moves by up to this fraction of the crop side (keystone / viewpoint change);
    brightness, contrast, saturation: maximum relative change; hue: maximum shift in degrees;
    blur_prob / blur_sigma: Gaussian blur; occlusion_prob / max_occluders / occluder_frac:
    rectangles of random colour or noise, each up to ``occluder_frac`` of the view side.
    """

    out_size: tuple[int, int] | None = None
    crop_frac: tuple[float, float] = (0.55, 0.95)
    out_scale: tuple[float, float] = (0.75, 1.25)
    max_rotation_deg: float = 15.0
    max_perspective: float = 0.12
    brightness: float = 0.25
    contrast: float = 0.25
    saturation: float = 0.3
    hue: float = 8.0
    blur_prob: float = 0.3
    blur_sigma: tuple[float, float] = (0.5, 1.8)
    occlusion_prob: float = 0.5
    max_occluders: int = 2
    occluder_frac: float = 0.3


@dataclass
class SyntheticView:
    """A positive view: ``image`` (uint8 HxWx3), ``homography`` (3x3 float64, source pixels -> view
    pixels, OpenCV pixel-centre convention) and ``occluded`` (bool HxW, True where an occluder was
    painted, so those view pixels do not show the source)."""

    image: np.ndarray
    homography: np.ndarray
    occluded: np.ndarray


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _quad_ok(quad: np.ndarray) -> bool:
    """Convex, non-degenerate, consistently oriented quadrilateral."""
    crosses = []
    for i in range(4):
        a, b, c = quad[i], quad[(i + 1) % 4], quad[(i + 2) % 4]
        crosses.append((b[0] - a[0]) * (c[1] - b[1]) - (b[1] - a[1]) * (c[0] - b[0]))
    crosses = np.array(crosses)
    return bool(np.all(crosses > 0) or np.all(crosses < 0))


def random_homography(src_size: tuple[int, int], out_size: tuple[int, int], cfg: ViewConfig,
                      rng: np.random.Generator) -> np.ndarray:
    """A random 3x3 homography taking a quadrilateral inside the source (h, w) onto the view (h, w).

    The quadrilateral is a rotated, perspective-jittered square-ish crop kept inside the source, so
    every view pixel shows source content.
    """
    sh, sw = src_size
    oh, ow = out_size
    for _ in range(50):
        frac = rng.uniform(*cfg.crop_frac)
        ch, cw = frac * sh, frac * sw
        # the crop keeps the view's aspect ratio so the zoom is (roughly) isotropic
        aspect = ow / oh
        if cw / ch > aspect:
            cw = ch * aspect
        else:
            ch = cw / aspect
        cx = rng.uniform(cw / 2, sw - cw / 2) if sw > cw else sw / 2
        cy = rng.uniform(ch / 2, sh - ch / 2) if sh > ch else sh / 2
        base = np.array([[-cw / 2, -ch / 2], [cw / 2, -ch / 2], [cw / 2, ch / 2], [-cw / 2, ch / 2]])
        ang = np.deg2rad(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg))
        rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
        jitter = rng.uniform(-cfg.max_perspective, cfg.max_perspective, size=(4, 2)) * np.array([cw, ch])
        quad = (base + jitter) @ rot.T + np.array([cx, cy])
        if quad[:, 0].min() < 0 or quad[:, 1].min() < 0 or quad[:, 0].max() > sw - 1 or quad[:, 1].max() > sh - 1:
            continue
        if not _quad_ok(quad):
            continue
        dst = np.array([[0, 0], [ow - 1, 0], [ow - 1, oh - 1], [0, oh - 1]], dtype=np.float32)
        return cv2.getPerspectiveTransform(quad.astype(np.float32), dst).astype(np.float64)
    # bounds too tight for this source (e.g. large rotation on a thin image): fall back to a plain crop
    log.debug("random_homography: fell back to a full-image scaling for source %s", src_size)
    return np.array([[(ow - 1) / max(sw - 1, 1), 0, 0], [0, (oh - 1) / max(sh - 1, 1), 0], [0, 0, 1]], dtype=np.float64)


def colour_jitter(img: np.ndarray, cfg: ViewConfig, rng: np.random.Generator) -> np.ndarray:
    """Random brightness, contrast, saturation and hue changes (uint8 RGB in and out)."""
    x = img.astype(np.float32)
    grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
    if cfg.saturation > 0:
        s = rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
        x = grey[..., None] + s * (x - grey[..., None])
    if cfg.contrast > 0:
        c = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
        x = grey.mean() + c * (x - grey.mean())
    if cfg.brightness > 0:
        x = x * rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
    out = np.clip(x, 0, 255).astype(np.uint8)
    if cfg.hue > 0:
        hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)  # OpenCV hue is degrees / 2 in [0, 180)
        shift = int(round(rng.uniform(-cfg.hue, cfg.hue) / 2))
        hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 180).astype(np.uint8)
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return out


def random_view(img: np.ndarray, rng: np.random.Generator | int | None = None,
                cfg: ViewConfig = ViewConfig()) -> SyntheticView:
    """A random positive view of a uint8 RGB image and the homography source -> view."""
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ImageError("random_view expects a uint8 HxWx3 RGB image")
    g = _rng(rng)
    sh, sw = img.shape[:2]
    if cfg.out_size is not None:
        oh, ow = cfg.out_size
    else:
        s = g.uniform(*cfg.out_scale) * float(np.mean(cfg.crop_frac))
        oh, ow = max(8, int(round(sh * s))), max(8, int(round(sw * s)))
    hmat = random_homography((sh, sw), (oh, ow), cfg, g)
    view = cv2.warpPerspective(img, hmat, (ow, oh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    view = colour_jitter(view, cfg, g)
    if g.random() < cfg.blur_prob:
        view = cv2.GaussianBlur(view, (0, 0), g.uniform(*cfg.blur_sigma))
    occluded = np.zeros((oh, ow), dtype=bool)
    if g.random() < cfg.occlusion_prob:
        for _ in range(int(g.integers(1, cfg.max_occluders + 1))):
            bh = int(g.uniform(0.1, cfg.occluder_frac) * oh) + 1
            bw = int(g.uniform(0.1, cfg.occluder_frac) * ow) + 1
            y0, x0 = int(g.integers(0, max(1, oh - bh))), int(g.integers(0, max(1, ow - bw)))
            if g.random() < 0.5:
                patch = np.broadcast_to(g.integers(0, 256, size=3, dtype=np.uint8), (bh, bw, 3))
            else:
                patch = g.integers(0, 256, size=(bh, bw, 3), dtype=np.uint8)
            view[y0:y0 + bh, x0:x0 + bw] = patch[: oh - y0, : ow - x0]
            occluded[y0:y0 + bh, x0:x0 + bw] = True
    return SyntheticView(np.ascontiguousarray(view), hmat, occluded)


def overlap_box(homography: np.ndarray, view_size: tuple[int, int], src_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Box [x1,y1,x2,y2] in source pixels covering what the view (h, w) shows, clipped to the source.

    The view's corners are mapped back through the inverse homography; the box is their bounding
    box (exact for crops, a tight axis-aligned cover under rotation/perspective).
    """
    oh, ow = view_size
    sh, sw = src_size
    corners = np.array([[0, 0], [ow - 1, 0], [ow - 1, oh - 1], [0, oh - 1]], dtype=np.float64)
    p = np.concatenate([corners, np.ones((4, 1))], axis=1) @ np.linalg.inv(homography).T
    p = p[:, :2] / p[:, 2:3]
    x1, y1 = np.clip(p.min(0), 0, [sw - 1, sh - 1])
    x2, y2 = np.clip(p.max(0), 0, [sw - 1, sh - 1])
    return float(x1), float(y1), float(x2), float(y2)


def make_textured_scene(size: tuple[int, int] = (480, 640), rng: np.random.Generator | int | None = 0,
                        n_shapes: int = 120) -> np.ndarray:
    """A random, feature-rich RGB scene (shapes, lines, text-like strokes, noise): a stand-in photo for tests.

    Different seeds give unrelated scenes; SIFT finds many distinctive keypoints on them.
    """
    g = _rng(rng)
    h, w = size
    img = np.full((h, w, 3), g.integers(0, 256, size=3), dtype=np.uint8)
    for _ in range(n_shapes):
        col = tuple(int(c) for c in g.integers(0, 256, size=3))
        kind = g.integers(0, 4)
        x, y = int(g.integers(0, w)), int(g.integers(0, h))
        if kind == 0:
            cv2.circle(img, (x, y), int(g.integers(3, max(4, w // 12))), col, -1)
        elif kind == 1:
            cv2.rectangle(img, (x, y), (x + int(g.integers(5, w // 8)), y + int(g.integers(5, h // 8))), col, -1)
        elif kind == 2:
            cv2.line(img, (x, y), (int(g.integers(0, w)), int(g.integers(0, h))), col, int(g.integers(1, 4)))
        else:
            pts = (g.integers(-30, 30, size=(int(g.integers(3, 6)), 2)) + [x, y]).astype(np.int32)
            cv2.fillPoly(img, [pts], col)
    noise = g.normal(0, 6, size=img.shape)
    return np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# photo pools and the dataset
# --------------------------------------------------------------------------------------------
def _excluded(path: Path, patterns: Sequence[str]) -> bool:
    for pat in patterns:
        if path.name == pat or path.stem == pat or fnmatch.fnmatch(path.name, pat) or fnmatch.fnmatch(path.stem, pat):
            return True
    return False


def photo_pool(folder: str | os.PathLike, exclude: Iterable[str] = (),
               extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted), minus those whose name or stem matches ``exclude``.

    ``exclude`` holds file names, stems or glob patterns (``"graf*"``); use it to keep evaluation
    images (e.g. minidev's distractor sources) out of a training pool.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"photo folder {root} does not exist; give a folder of images")
    pats = [str(p) for p in exclude]
    exts = {e.lower() for e in extensions}
    out = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts and not _excluded(p, pats))
    if not out:
        raise DatasetError(f"no images ({', '.join(sorted(exts))}) left under {root} after exclusions")
    return out


def _default_transform(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)


class SyntheticPairDataset(Dataset):
    """(anchor, positive, index) or (anchor, positive, negatives) from a list of photos.

    The anchor is the photo resized to ``size`` (h, w); the positive is ``random_view`` of the
    anchor at the same size; negatives are random views of ``n_negatives`` other photos (also
    augmented, so "was augmented" does not give the positive away). The label of a pair is its
    photo index. With ``return_homography`` a 3x3 float32 tensor (anchor pixels -> positive pixels)
    is appended. ``transform`` turns uint8 HxWx3 into tensors (default: float [3,H,W] in [0,1];
    pass e.g. ``lambda im: to_tensor(im, model.input_spec)``). Call ``set_epoch`` to get new views.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], size: tuple[int, int] = (256, 256),
                 cfg: ViewConfig = ViewConfig(), n_negatives: int = 0, seed: int = 0,
                 transform: Callable[[np.ndarray], torch.Tensor] | None = None,
                 loader: Callable[[Path], np.ndarray] | None = None, return_homography: bool = False,
                 cache_images: bool = True) -> None:
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise DatasetError("SyntheticPairDataset needs at least one photo")
        if n_negatives > 0 and len(self.paths) < 2:
            raise ConfigError("negatives need at least two photos in the pool")
        self.size = (int(size[0]), int(size[1]))
        self.cfg = dataclasses.replace(cfg, out_size=self.size)
        self.n_negatives, self.seed, self.epoch = int(n_negatives), int(seed), 0
        self.transform = transform or _default_transform
        self.loader = loader
        self.return_homography = return_homography
        self._cache: dict[int, np.ndarray] | None = {} if cache_images else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def _anchor(self, i: int) -> np.ndarray:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        if self.loader is not None:
            img = self.loader(self.paths[i])
        else:
            img = load_image(self.paths[i])
        h, w = self.size
        interp = cv2.INTER_AREA if img.shape[0] * img.shape[1] > h * w else cv2.INTER_LINEAR
        img = np.ascontiguousarray(cv2.resize(img, (w, h), interpolation=interp))
        if self._cache is not None:
            self._cache[i] = img
        return img

    def __getitem__(self, i: int):
        g = np.random.default_rng([self.seed, self.epoch, int(i)])
        anchor = self._anchor(i)
        view = random_view(anchor, g, self.cfg)
        out: list = [self.transform(anchor), self.transform(view.image)]
        if self.n_negatives > 0:
            others = np.delete(np.arange(len(self.paths)), i)
            pick = g.choice(others, size=self.n_negatives, replace=len(others) < self.n_negatives)
            negs = [self.transform(random_view(self._anchor(int(j)), g, self.cfg).image) for j in pick]
            out.append(torch.stack(negs))
        else:
            out.append(int(i))
        if self.return_homography:
            out.append(torch.from_numpy(view.homography.astype(np.float32)))
        return tuple(out)

"""Image decoding and preprocessing: one place that turns any file into the pixels a model sees.

Images are numpy ``uint8`` arrays of shape ``[H, W, 3]`` in RGB order, C-contiguous. Decoding uses
Pillow (EXIF orientation applied, every common mode converted to RGB); resizing uses OpenCV on the
uint8 image so multi-scale descriptors match the published test code (CVNet) bit for bit.

Mode conversion decisions (documented because they change pixels):

* transparent images (``LA``, ``RGBA``, ``PA``, ``P`` with a transparency key) are alpha-composited
  onto **white**, which is what a viewer shows; dropping alpha would expose arbitrary colours stored
  under fully transparent pixels (often black).
* 16-bit and 32-bit integer images (``I;16*``, ``I``) are taken to use the 16-bit range and mapped
  to 8 bits by ``round(v / 257)`` after clipping to [0, 65535]; Pillow's own conversion clips at 255,
  which turns most 16-bit photos white.
* float images (``F``) are clipped to [0, 255] and rounded (Pillow's convention).
* ``CMYK``, ``1``, ``L``, ``YCbCr`` and the rest go through Pillow's ``convert("RGB")``.
"""
from __future__ import annotations

import io
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from irkit.errors import ConfigError, ImageError

log = logging.getLogger(__name__)

#: Largest image (width * height) decoded by default: Pillow's own hard limit (2 x 89,478,485,
#: about 13k x 13k). Pass ``max_pixels`` to change it per call; ``None`` disables irkit's check
#: (Pillow's hard limit then still applies unless ``PIL.Image.MAX_IMAGE_PIXELS`` is raised).
DEFAULT_MAX_PIXELS: int = 2 * 89_478_485

#: File extensions (lower case) treated as images everywhere: collections to extract, training
#: folders, photo pools, cleaning. The one list, so an image that is extracted is also trained on;
#: each is a format :func:`load_image` decodes (GIF: its first frame).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                                     ".ppm", ".pgm")

INTERPOLATIONS: dict[str, int] = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
    "lanczos": cv2.INTER_LANCZOS4,
}


@dataclass(frozen=True)
class InputSpec:
    """A model's input convention; mean/std are given in ``channel_order`` order."""

    channel_order: str = "RGB"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    max_side: int | None = None
    interp_down: str = "area"
    interp_up: str = "linear"

    def __post_init__(self) -> None:
        order = str(self.channel_order).upper()
        if order not in ("RGB", "BGR"):
            raise ConfigError(f"InputSpec.channel_order must be 'RGB' or 'BGR', got {self.channel_order!r}")
        object.__setattr__(self, "channel_order", order)
        for field in ("mean", "std"):
            vals = tuple(float(v) for v in getattr(self, field))
            if len(vals) != 3 or not all(math.isfinite(v) for v in vals):
                raise ConfigError(f"InputSpec.{field} must be 3 finite numbers, got {getattr(self, field)!r}")
            object.__setattr__(self, field, vals)
        if any(s == 0 for s in self.std):
            raise ConfigError(f"InputSpec.std must not contain 0, got {self.std!r}")
        if self.max_side is not None and (int(self.max_side) != self.max_side or self.max_side < 1):
            raise ConfigError(f"InputSpec.max_side must be a positive integer or None, got {self.max_side!r}")
        _interp(self.interp_down)
        _interp(self.interp_up)


def _interp(name: str) -> int:
    try:
        return INTERPOLATIONS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown interpolation {name!r}; use one of {sorted(INTERPOLATIONS)}") from None


# ----------------------------------------------------------------------------------------- decode

def load_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file to RGB uint8 ``[H, W, 3]``; every failure is an ImageError naming the file."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image file")
    try:
        size = path.stat().st_size
        fh = open(path, "rb")
    except OSError as exc:
        raise ImageError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if size == 0:
        fh.close()
        raise ImageError(f"{path}: empty file (0 bytes)")
    with fh:
        return _decode(fh, str(path), max_pixels)


def decode_image_bytes(data: bytes, name: str = "<upload>", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes (an upload, a tar member) exactly like :func:`load_image`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"{name}: expected encoded image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageError(f"{name}: empty data (0 bytes)")
    return _decode(io.BytesIO(bytes(data)), name, max_pixels)


def _decode(fh: BinaryIO, name: str, max_pixels: int | None) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # irkit enforces its own limit below; Pillow's warning would only be noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fh)  # lazy: reads the header only
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: refused, image too large to decode safely ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not a recognised image format (corrupt file or not an image)") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        reason = "truncated file" if "truncated" in str(exc).lower() else str(exc)
        raise ImageError(f"{name}: cannot read image header ({reason})") from exc
    with img:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageError(f"{name}: image has an empty size {width}x{height}")
        if max_pixels is not None and width * height > max_pixels:
            raise ImageError(
                f"{name}: refused to decode a {width}x{height} image ({width * height:,} pixels > limit "
                f"{max_pixels:,}); this may be a decompression bomb. Raise max_pixels if the file is trusted")
        try:
            img.load()
        except Image.DecompressionBombError as exc:
            raise ImageError(f"{name}: refused, image too large to decode safely ({exc})") from exc
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            reason = "truncated file" if "truncated" in str(exc).lower() else f"corrupt data ({exc})"
            raise ImageError(f"{name}: cannot decode image: {reason}") from exc
        img = _apply_exif(img, name)
        try:
            arr = _to_rgb(img)
        except (OSError, ValueError) as exc:
            raise ImageError(f"{name}: cannot convert mode {img.mode!r} to RGB ({exc})") from exc
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _apply_exif(img: Image.Image, name: str) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(img)
    except Exception as exc:  # broken EXIF must not lose an otherwise good image
        log.warning("%s: ignoring unreadable EXIF orientation (%s)", name, exc)
        return img
    return img if out is None else out


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img)
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    elif mode == "PA":
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if mode.startswith("I;16") or mode == "I":
        raw = np.asarray(img).astype(np.float64)
        gray = np.rint(np.clip(raw, 0, 65535) / 257.0).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        gray = np.rint(np.clip(np.asarray(img, dtype=np.float64), 0, 255)).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


# ------------------------------------------------------------------------------- geometric ops

def _check_image(img: np.ndarray) -> None:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        desc = f"{img.dtype} array of shape {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ImageError(f"expected a uint8 [H, W, 3] image (use load_image), got {desc}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ImageError(f"image is empty (shape {img.shape})")


def crop_bbx(img: np.ndarray, bbx: Sequence[float]) -> np.ndarray:
    """Crop to ``[x1, y1, x2, y2]`` (zero-based floats) with int() truncation, as the published
    revisitop/CVNet code does (``img[int(y1):int(y2), int(x1):int(x2)]``), clipped to the image."""
    _check_image(img)
    try:
        vals = [float(v) for v in bbx]
    except (TypeError, ValueError):
        raise ImageError(f"bounding box must be 4 numbers [x1, y1, x2, y2], got {bbx!r}") from None
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise ImageError(f"bounding box must be 4 finite numbers [x1, y1, x2, y2], got {bbx!r}")
    h, w = img.shape[:2]
    x1, y1, x2, y2 = (int(v) for v in vals)
    x1, x2 = min(max(x1, 0), w), min(max(x2, 0), w)
    y1, y2 = min(max(y1, 0), h), min(max(y2, 0), h)
    if x2 <= x1 or y2 <= y1:
        raise ImageError(f"bounding box {list(vals)} gives an empty crop of a {w}x{h} image")
    return np.ascontiguousarray(img[y1:y2, x1:x2])


def resize_scale(img: np.ndarray, scale: float, interp_down: str = "area", interp_up: str = "linear") -> np.ndarray:
    """Multiply both sides by ``scale`` (cv2.resize, fx=fy=scale); 1.0 returns the image unchanged."""
    _check_image(img)
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ConfigError(f"resize scale must be a positive number, got {scale!r}")
    if scale == 1.0:
        return img
    h, w = img.shape[:2]
    # cv2 rounds the output size to nearest; refuse instead of letting cv2 assert on 0
    if round(w * scale) < 1 or round(h * scale) < 1:
        raise ImageError(f"a {w}x{h} image scaled by {scale} has no pixels left")
    interp = _interp(interp_down if scale < 1.0 else interp_up)
    return np.ascontiguousarray(cv2.resize(img, None, fx=scale, fy=scale, interpolation=interp))


def resize_max_side(img: np.ndarray, max_side: int, interp_down: str = "area", interp_up: str = "linear") -> np.ndarray:
    """Resize so the longer side is exactly ``max_side`` (aspect kept, shorter side rounded, >= 1)."""
    _check_image(img)
    if int(max_side) != max_side or max_side < 1:
        raise ConfigError(f"max_side must be a positive integer, got {max_side!r}")
    max_side = int(max_side)
    h, w = img.shape[:2]
    long_side = max(h, w)
    if long_side == max_side:
        return img
    scale = max_side / long_side
    new_w = max_side if w >= h else max(1, round(w * scale))
    new_h = max_side if h > w else max(1, round(h * scale))
    interp = _interp(interp_down if max_side < long_side else interp_up)
    return np.ascontiguousarray(cv2.resize(img, (new_w, new_h), interpolation=interp))


# ---------------------------------------------------------------------------------- to tensor

def to_tensor(img: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """float32 ``[3, H, W]``: reorder channels, ``x / 255``, ``(x - mean) / std`` (all float32, the
    exact order of operations of the CVNet test code so features match bit for bit)."""
    _check_image(img)
    arr = img[:, :, ::-1] if spec.channel_order == "BGR" else img
    x = arr.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    x = (x - mean) / std
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

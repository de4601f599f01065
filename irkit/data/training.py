"""Training data: labelled image lists from several layouts, deterministic batches, augmentation.

Why this shape: every recipe consumes a batch of images with integer labels (class, 3D-model
cluster, or source photo), laid out as groups of ``per_class`` images of one label, so in-batch
positives exist for ranking losses and the same batches feed classification losses. A batch is a
pure function of (seed, step): resuming at step k replays exactly the batches an uninterrupted run
would have seen, whatever the number of DataLoader workers.

Labelled images come from :mod:`irkit.data.labelled` (folder per class, GLDv2 CSV, pairs CSV,
SfM-120k pickle); this module adds the batches and augmentation on top. Label-free training:

* ``SyntheticViewSet(photos)``: label-free: every photo is a class; slot 0 of a group is the photo,
  slots >= 1 are random views from :mod:`irkit.data.synthetic_pairs`, and slot 0 carries the box
  (in its pixels) of what slot 1 shows, so region proposals can be supervised.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from irkit.data.labelled import Box, LabelledImages, folder_per_class, gldv2_csv, pairs_csv, sfm120k_pickle
from irkit.data.synthetic_pairs import ViewConfig, make_textured_scene, overlap_box, random_view
from irkit.errors import ConfigError, DatasetError
from irkit.io.images import InputSpec, load_image, to_tensor
from irkit.utils import atomic_path

log = logging.getLogger(__name__)

# the readers that irkit.train imports from here; new code imports them from irkit.data.labelled
gldv2_clean = gldv2_csv
__all__ = ["LabelledImages", "folder_per_class", "gldv2_clean", "pairs_csv", "sfm120k_pickle", "group_seed",
           "BalancedBatches", "random_resized_crop", "AugmentedImages", "SyntheticViewSet", "synthetic_scenes",
           "collate"]


# ------------------------------------------------------------------------------------ batches
def group_seed(seed: int, step: int, group: int) -> int:
    """A 63-bit seed for one label group of one step (stable across runs and workers)."""
    return int(np.random.default_rng([seed, step, group, 7]).integers(0, 2**63 - 1))


class BalancedBatches(Sampler):
    """Batches of ``batch_size // per_class`` labels x ``per_class`` images, a pure function of
    ``(seed, step)``. Labels are visited in a fresh permutation each epoch; a label with fewer than
    ``per_class`` images repeats images (with different augmentations). Each item is
    ``(image_index, group_seed, slot)``. ``start_step`` resumes; ``shard=(rank, world)`` gives each
    DDP rank a disjoint slice of every global batch."""

    def __init__(self, labels: np.ndarray, batch_size: int, per_class: int = 2, seed: int = 0,
                 start_step: int = 0, total_steps: int | None = None,
                 shard: tuple[int, int] = (0, 1)) -> None:
        if per_class < 1 or batch_size < per_class or batch_size % per_class:
            raise ConfigError(f"batch_size ({batch_size}) must be a positive multiple of per_class ({per_class})")
        labels = np.asarray(labels, dtype=np.int64)
        self.by_label = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]
        self.classes = np.asarray([c for c, m in enumerate(self.by_label) if m.size], dtype=np.int64)
        self.groups = batch_size // per_class
        if self.classes.size < min(self.groups, 2):
            raise ConfigError(f"only {self.classes.size} labels with images; a batch needs at least 2 "
                              "(lower data.batch_size or add data)")
        self.batch_size, self.per_class, self.seed = batch_size, per_class, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.rank, self.world = shard
        if batch_size % self.world:
            raise ConfigError(f"batch_size {batch_size} is not divisible by the {self.world} DDP ranks")
        self.steps_per_epoch = max(1, self.classes.size // self.groups)

    def batch(self, step: int) -> list[tuple[int, int, int]]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        perm = np.random.default_rng([self.seed, epoch, 1]).permutation(self.classes)
        if perm.size < self.groups:  # fewer labels than groups: tile the permutation
            perm = np.resize(perm, self.groups)
        chosen = perm[pos * self.groups:(pos + 1) * self.groups]
        if chosen.size < self.groups:
            chosen = np.concatenate([chosen, perm[: self.groups - chosen.size]])
        items = []
        for g, c in enumerate(chosen):
            gs = group_seed(self.seed, step, g)
            members = self.by_label[int(c)]
            rng = np.random.default_rng(gs)
            pick = rng.choice(members, size=self.per_class, replace=members.size < self.per_class)
            items.extend((int(i), gs, slot) for slot, i in enumerate(pick))
        per_rank = self.batch_size // self.world
        return items[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        step = self.start_step
        while self.total_steps is None or step < self.total_steps:
            yield self.batch(step)
            step += 1

    def __len__(self) -> int:
        if self.total_steps is None:
            raise TypeError("endless sampler")
        return max(0, self.total_steps - self.start_step)


# ------------------------------------------------------------------------------- augmentation
def random_resized_crop(img: np.ndarray, size: int, rng: np.random.Generator, scale: tuple[float, float] = (1.0, 1.25),
                        flip: bool = True, box: Box | None = None) -> tuple[np.ndarray, Box | None]:
    """Resize the shorter side to ``size * U(scale)``, crop ``size x size`` at random, flip with
    p=0.5; the box (pixels) follows the same transform and is clipped to the crop."""
    h, w = img.shape[:2]
    s = size * rng.uniform(*scale) / min(h, w)
    nh, nw = max(size, int(round(h * s))), max(size, int(round(w * s)))
    interp = cv2.INTER_AREA if nh * nw < h * w else cv2.INTER_LINEAR
    img = cv2.resize(img, (nw, nh), interpolation=interp)
    y0, x0 = int(rng.integers(0, nh - size + 1)), int(rng.integers(0, nw - size + 1))
    img = img[y0:y0 + size, x0:x0 + size]
    sx, sy = nw / w, nh / h
    if box is not None:
        x1, y1, x2, y2 = box
        box = (float(np.clip(x1 * sx - x0, 0, size)), float(np.clip(y1 * sy - y0, 0, size)),
               float(np.clip(x2 * sx - x0, 0, size)), float(np.clip(y2 * sy - y0, 0, size)))
    if flip and rng.random() < 0.5:
        img = img[:, ::-1]
        if box is not None:
            box = (size - box[2], box[1], size - box[0], box[3])
    return np.ascontiguousarray(img), box


def _box_tensor(box: Box | None) -> torch.Tensor:
    return torch.tensor(box if box is not None else (-1.0, -1.0, -1.0, -1.0), dtype=torch.float32)


class AugmentedImages(Dataset):
    """Items ``(index, seed, slot)`` -> ``(image [3,S,S], label, box [4] or -1s)``."""

    def __init__(self, data: LabelledImages, size: int, spec: InputSpec, scale: tuple[float, float] = (1.0, 1.25),
                 flip: bool = True, loader: Callable[[Path], np.ndarray] = load_image) -> None:
        self.data, self.size, self.spec, self.scale, self.flip, self.loader = data, size, spec, scale, flip, loader

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int, int]):
        index, seed, slot = key
        rng = np.random.default_rng([seed, slot])
        img, box = random_resized_crop(self.loader(self.data.paths[index]), self.size, rng, self.scale,
                                       self.flip, self.data.boxes[index])
        return to_tensor(img, self.spec), int(self.data.labels[index]), _box_tensor(box)


class SyntheticViewSet(Dataset):
    """Label-free training from photos: label = photo index. Slot 0: the photo (resized to S x S)
    with the box of what slot 1's view shows; slot s >= 1: a random view (homography + photometric
    changes + occluders). Views of one group derive from the group seed, so slot 0 knows slot 1."""

    def __init__(self, photos: Sequence[str | os.PathLike], size: int, spec: InputSpec,
                 view_cfg=None, loader: Callable[[Path], np.ndarray] = load_image, cache: bool = True) -> None:
        self.paths = [Path(p) for p in photos]
        if len(self.paths) < 2:
            raise DatasetError("synthetic training needs at least 2 photos")
        self.size, self.spec, self.loader = size, spec, loader
        base = view_cfg or ViewConfig()
        self.view_cfg = ViewConfig(**{**base.__dict__, "out_size": (size, size)})
        self._cache: dict[int, np.ndarray] | None = {} if cache else None
        self.labels = np.arange(len(self.paths), dtype=np.int64)

    @property
    def data(self) -> LabelledImages:
        return LabelledImages(self.paths, self.labels, [p.stem for p in self.paths])

    def __len__(self) -> int:
        return len(self.paths)

    def photo(self, i: int) -> np.ndarray:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        img = self.loader(self.paths[i])
        interp = cv2.INTER_AREA if img.shape[0] * img.shape[1] > self.size ** 2 else cv2.INTER_LINEAR
        img = np.ascontiguousarray(cv2.resize(img, (self.size, self.size), interpolation=interp))
        if self._cache is not None:
            self._cache[i] = img
        return img

    def __getitem__(self, key: tuple[int, int, int]):
        index, seed, slot = key
        img = self.photo(index)
        view = random_view(img, np.random.default_rng([seed, max(slot, 1)]), self.view_cfg)
        if slot == 0:
            box = overlap_box(view.homography, view.image.shape[:2], img.shape[:2])
            return to_tensor(img, self.spec), int(index), _box_tensor(box)
        return to_tensor(view.image, self.spec), int(index), _box_tensor(None)


def synthetic_scenes(folder: str | os.PathLike, n: int, size: int = 256, seed: int = 0) -> list[Path]:
    """Write ``n`` generated textured scenes (PNG) into ``folder`` once; a label-free set for tests
    and learning checks that needs no photos at all."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"scene_{seed}_{i:05d}.png"
        if not p.is_file():  # written atomically: DDP ranks may generate the same set concurrently
            img = make_textured_scene((size, size), rng=np.random.default_rng([seed, i]))
            with atomic_path(p, suffix=".png") as tmp:
                cv2.imwrite(str(tmp), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        out.append(p)
    return out


def collate(batch: list[tuple[torch.Tensor, int, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """List of (image, label, box) -> {"images" [B,3,S,S], "labels" [B], "boxes" [B,4] (-1 = none)}."""
    images, labels, boxes = zip(*batch)
    return {"images": torch.stack(images), "labels": torch.tensor(labels, dtype=torch.long),
            "boxes": torch.stack(boxes)}

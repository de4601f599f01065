"""The registry of training-data kinds (``data.kind``): one place that knows how each is read.

A kind turns the ``data`` section of a training config into a :class:`LabelledImages` (paths +
integer labels). Label-free kinds (``synthetic``, ``scenes``) make every photo its own class and
get their positives from random views; labelled kinds read a layout on disk. Config validation,
the CLI's help and every recipe read this one table, so a new kind is one ``register_data_kind``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch.utils.data import Dataset

from irkit.data import training as T
from irkit.data.labelled import LabelledImages, folder_per_class, gldv2_csv, pairs_csv, sfm120k_pickle
from irkit.data.photo_sources import locate_photo_pool
from irkit.data.synthetic_pairs import photo_pool
from irkit.errors import ConfigError
from irkit.io.images import InputSpec

__all__ = ["DataKind", "TrainData", "DATA_KINDS", "register_data_kind", "data_kind_names", "load_source",
           "build_dataset", "val_class_labels", "split_val"]


@dataclass(frozen=True)
class DataKind:
    """``load(cfg) -> (LabelledImages, description)``; ``label_free``: each photo is a class and its
    positives are synthetic views of it."""

    name: str
    load: Callable[[Any], tuple[LabelledImages, str]]
    label_free: bool
    description: str


@dataclass
class TrainData:
    """What a recipe trains on: an image dataset keyed ``(index, seed, slot)`` (None for recipes
    that read ``source`` themselves), its labels, class count and a description for the log."""

    dataset: Dataset | None
    labels: np.ndarray
    num_classes: int
    description: str
    source: LabelledImages
    label_free: bool
    val: LabelledImages | None = None     # held-out classes (data.val_classes / data.val_class_names)


DATA_KINDS: dict[str, DataKind] = {}


def register_data_kind(kind: DataKind) -> DataKind:
    if kind.name in DATA_KINDS:
        raise ValueError(f"data kind {kind.name!r} registered twice")
    DATA_KINDS[kind.name] = kind
    return kind


def data_kind_names() -> list[str]:
    return sorted(DATA_KINDS)


def get_data_kind(name: str) -> DataKind:
    if name not in DATA_KINDS:
        raise ConfigError(f"data.kind must be one of {', '.join(data_kind_names())} (got {name!r})")
    return DATA_KINDS[name]


def _photos(paths: list[Path], desc: str) -> tuple[LabelledImages, str]:
    """Label-free: every photo is its own class (named after the file)."""
    return LabelledImages(list(paths), np.arange(len(paths)), [Path(p).name for p in paths]), desc


def _synthetic(cfg) -> tuple[LabelledImages, str]:
    D = cfg.data
    if D.path and D.path != "auto":
        return _photos(photo_pool(D.path, exclude=D.exclude), f"photos under {D.path}")
    srcs = "auto" if list(D.photo_sources) in (["auto"], []) else list(D.photo_sources)
    return _photos(locate_photo_pool(srcs, exclude=D.exclude), f"photos from photo sources {D.photo_sources}")


def _scenes(cfg) -> tuple[LabelledImages, str]:
    D = cfg.data
    folder = Path(D.path or Path(cfg.out_dir) / "scenes")
    return _photos(T.synthetic_scenes(folder, D.num_scenes, size=max(256, D.image_size), seed=cfg.seed),
                   f"generated scenes in {folder}")


for _kind in (
    DataKind("synthetic", _synthetic, True, "label-free: photos (data.path, or data.photo_sources when "
             "'auto'), views of one photo are positives"),
    DataKind("scenes", _scenes, True, "label-free: data.num_scenes generated textured scenes"),
    DataKind("gldv2", lambda c: (gldv2_csv(c.data.path, c.data.image_root or None), f"gldv2 {c.data.path}"),
             False, "GLDv2 train_clean.csv / train.csv (data.path) + image root (data.image_root)"),
    DataKind("pairs", lambda c: (pairs_csv(c.data.path, c.data.image_root or None), f"pairs {c.data.path}"),
             False, "CSV query,positive,cluster (SfM-120k style)"),
    DataKind("sfm120k", lambda c: (sfm120k_pickle(c.data.path, c.data.image_root, c.data.split),
                                   f"sfm120k {c.data.path}"), False, "cirtorch retrieval-SfM-120k.pkl"),
    DataKind("folder", lambda c: (folder_per_class(c.data.path), f"folder {c.data.path}"), False,
             "one sub-folder per class"),
):
    register_data_kind(_kind)


def load_source(cfg) -> tuple[LabelledImages, bool, str]:
    """(images with labels, label-free?, description) of ``cfg.data``; labelled kinds keep the classes
    with at least ``data.min_images`` images, and any kind the first ``data.max_classes`` classes."""
    kind = get_data_kind(cfg.data.kind)
    data, desc = kind.load(cfg)
    if cfg.data.max_classes or (cfg.data.min_images > 1 and not kind.label_free):
        data = data.filter_classes(1 if kind.label_free else cfg.data.min_images, cfg.data.max_classes)
    return data, kind.label_free, f"{len(data)} images in {data.num_classes} classes ({desc})"


def val_class_labels(cfg, data: LabelledImages) -> set[int]:
    """Labels of ``data`` held out for validation: the classes named in ``data.val_class_names``
    (ConfigError for a name that is not a class), else ``data.val_classes`` classes drawn with the
    seed (at most all but two, so training keeps negatives)."""
    names = list(cfg.data.val_class_names or [])
    if names:
        index = {n: i for i, n in enumerate(data.class_names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise ConfigError(f"data.val_class_names: no class named {missing[:5]} (classes: "
                              f"{', '.join(data.class_names[:10])}{', …' if len(data.class_names) > 10 else ''})")
        if len(names) > data.num_classes - 2:
            raise ConfigError(f"data.val_class_names holds {len(names)} of {data.num_classes} classes; leave at "
                              "least two for training")
        return {index[n] for n in names}
    classes = np.unique(data.labels)
    n_val = min(int(cfg.data.val_classes), len(classes) - 2)
    if n_val <= 0:
        return set()
    rng = np.random.default_rng([cfg.seed, 7919])
    return set(rng.permutation(classes)[:n_val].tolist())


def split_val(cfg, data: LabelledImages) -> tuple[LabelledImages, LabelledImages | None]:
    """(training images, held-out validation images or None), split by class."""
    val = val_class_labels(cfg, data)
    if not val:
        return data, None
    is_val = np.isin(data.labels, sorted(val))
    return data.select(np.flatnonzero(~is_val)), data.select(np.flatnonzero(is_val))


def build_dataset(cfg, spec: InputSpec) -> TrainData:
    """The image dataset of ``cfg.data`` for recipes that train on image batches; classes held out
    for validation (``data.val_classes`` / ``data.val_class_names``) are left out of it."""
    data, label_free, desc = load_source(cfg)
    data, val = split_val(cfg, data)
    if val is not None:
        desc += f"; {len(val)} images of {val.num_classes} classes held out for validation"
    if label_free:
        ds: Dataset = T.SyntheticViewSet(data.paths, cfg.data.image_size, spec)
    else:
        ds = T.AugmentedImages(data, cfg.data.image_size, spec)
    return TrainData(ds, data.labels, data.num_classes, desc, data, label_free, val)

"""Labelled images: the one reader of class-labelled image sets, for training and for cleaning.

Why one module: training recipes, the re-ranker's training and ``irkit clean`` all need "image
files with a class each". Separate readers drifted apart (different extension lists, different
id rules), so each layout is read here, once, into one :class:`LabelledImages`.

Layouts (:func:`load_labelled` picks one from the source):

* folder per class, ``root/<class>/<image>`` (:func:`folder_per_class`): recursive inside each
  class folder, hidden files and folders skipped, extensions from
  :data:`irkit.io.images.IMAGE_EXTENSIONS`; classes sorted by name; an image's id is its path
  inside the class folder without the extension (``v0``, ``sub/v1``).
* GLDv2 CSV (:func:`gldv2_csv`): ``train_clean.csv`` (``landmark_id,images``, images
  space-separated) or ``train.csv`` (``id,url,landmark_id``), images at ``root/a/b/c/<id>.jpg``;
  classes are the landmark ids in numeric order, class names their decimal strings.
* pairs CSV (:func:`pairs_csv`): SfM-120k-style tuples with header ``query,positive,cluster``
  (paths relative to ``root``; ``cluster`` an integer 3D-model id); images labelled by cluster.
* cirtorch's ``retrieval-SfM-120k.pkl`` (:func:`sfm120k_pickle`), layout *as remembered*
  (unverified): ``db[split]`` with ``cids``, ``cluster``, ``qidxs``, ``pidxs``; file of id ``cid``
  at ``root/cid[-2:]/cid[-4:-2]/cid[-6:-4]/cid``. Prefer a pairs CSV when in doubt.
"""
from __future__ import annotations

import csv
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np

from irkit.data.gldv2 import image_path, open_csv
from irkit.errors import DatasetError
from irkit.io.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]


@dataclass
class LabelledImages:
    """Image files with integer labels in ``[0, num_classes)``, in a stable order.

    ``class_names[label]`` names a class (folder name, landmark id, cluster id); ``ids`` name the
    images (default: the file stems); ``boxes`` are optional boxes in pixels (where the object is);
    ``urls`` the download addresses when the source lists them."""

    paths: list[Path]
    labels: np.ndarray
    class_names: list[str]
    ids: list[str] = field(default_factory=list)
    boxes: list[Box | None] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.paths = [Path(p) for p in self.paths]
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.class_names = [str(c) for c in self.class_names]
        n = len(self.paths)
        if len(self.labels) != n:
            raise DatasetError(f"{n} paths but {len(self.labels)} labels")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise DatasetError(f"labels must lie in [0, {len(self.class_names)}) (one per class name)")
        self.ids = list(self.ids) if self.ids else [p.stem for p in self.paths]
        self.boxes = list(self.boxes) if self.boxes else [None] * n
        for name, values in (("ids", self.ids), ("boxes", self.boxes)):
            if len(values) != n:
                raise DatasetError(f"{n} paths but {len(values)} {name}")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def by_class(self) -> dict[str, list[int]]:
        """Class name -> its rows (in order), classes in label order; classes without images omitted."""
        rows: dict[int, list[int]] = {}
        for i, label in enumerate(self.labels.tolist()):
            rows.setdefault(label, []).append(i)
        return {self.class_names[c]: rows[c] for c in sorted(rows)}

    def select(self, rows: Sequence[int] | np.ndarray) -> "LabelledImages":
        """The images at ``rows`` (in that order); classes left without images are dropped and the
        labels renumbered in class order."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        kept = np.unique(self.labels[rows])
        remap = np.full(self.num_classes, -1, dtype=np.int64)
        remap[kept] = np.arange(kept.size)
        pick = rows.tolist()
        return LabelledImages([self.paths[i] for i in pick], remap[self.labels[rows]],
                              [self.class_names[c] for c in kept.tolist()], ids=[self.ids[i] for i in pick],
                              boxes=[self.boxes[i] for i in pick],
                              urls=[self.urls[i] for i in pick] if self.urls else [])

    def filter_classes(self, min_images: int = 1, max_classes: int | None = None) -> "LabelledImages":
        """Only classes with at least ``min_images`` images, the first ``max_classes`` of them (small runs)."""
        counts = np.bincount(self.labels, minlength=self.num_classes)
        keep = np.flatnonzero(counts >= min_images)
        if max_classes is not None:
            keep = keep[:max_classes]
        rows = np.flatnonzero(np.isin(self.labels, keep))
        if rows.size == 0:
            raise DatasetError(f"no class has at least {min_images} images")
        return self.select(rows)


# ------------------------------------------------------------------------------------- layouts
def folder_per_class(root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> LabelledImages:
    """``root/<class>/<images>`` (see the module docstring); DatasetError when no class has images."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist; expected root/<class>/<images>")
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    paths: list[Path] = []
    ids: list[str] = []
    labels: list[int] = []
    names: list[str] = []
    for cls_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        rels = []
        for dirpath, dirnames, filenames in os.walk(cls_dir, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            base = Path(dirpath).relative_to(cls_dir)
            rels.extend((base / f).as_posix() for f in filenames
                        if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts)
        if not rels:
            continue
        rels.sort()
        names.append(cls_dir.name)
        paths.extend(cls_dir / r for r in rels)
        ids.extend(str(PurePosixPath(r).with_suffix("")) for r in rels)
        labels.extend([len(names) - 1] * len(rels))
    if not paths:
        raise DatasetError(f"{root}: no class folders with images ({', '.join(sorted(exts))}); "
                           "expected root/<class>/<images>")
    return LabelledImages(paths, np.asarray(labels), names, ids=ids)


def gldv2_csv(csv_path: str | os.PathLike, image_root: str | os.PathLike | None = None, min_images: int = 1,
              max_classes: int | None = None) -> LabelledImages:
    """A GLDv2 training CSV, ``train_clean.csv`` or ``train.csv`` (told apart by their columns), with
    images under ``image_root`` (default: the CSV's folder); see :meth:`LabelledImages.filter_classes`
    for ``min_images`` and ``max_classes``."""
    path = Path(csv_path)
    reader, fh = open_csv(path, ())
    ids: list[str] = []
    landmarks: list[int] = []
    urls: list[str] = []
    with fh:
        fields = reader.fieldnames or []
        clean = "images" in fields
        missing = [c for c in (("landmark_id", "images") if clean else ("id", "landmark_id")) if c not in fields]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {missing}; a GLDv2 CSV has landmark_id,images "
                               f"(train_clean.csv) or id,url,landmark_id (train.csv); found {fields}")
        for lineno, row in enumerate(reader, 2):
            lm = _landmark(row["landmark_id"], path, lineno)
            if clean:
                imgs = (row["images"] or "").split()
                if not imgs:
                    raise DatasetError(f"{path}:{lineno}: landmark {lm} lists no images")
            else:
                imgs = [(row["id"] or "").strip()]
                if not imgs[0]:
                    raise DatasetError(f"{path}:{lineno}: empty id")
                urls.append((row.get("url") or "").strip())
            ids.extend(imgs)
            landmarks.extend([lm] * len(imgs))
    if not ids:
        raise DatasetError(f"{path} holds no images")
    _check_unique(ids, path)
    classes, labels = np.unique(np.asarray(landmarks, dtype=np.int64), return_inverse=True)
    root = Path(image_root) if image_root is not None else path.parent
    data = LabelledImages([image_path(root, i) for i in ids], labels, [str(c) for c in classes.tolist()],
                          ids=ids, urls=urls)
    log.info("%s: %d images, %d classes", path, len(data), data.num_classes)
    if min_images > 1 or max_classes is not None:
        try:
            data = data.filter_classes(min_images, max_classes)
        except DatasetError as exc:
            raise DatasetError(f"{path}: {exc}") from None
    return data


def pairs_csv(csv_path: str | os.PathLike, root: str | os.PathLike | None = None) -> LabelledImages:
    """Tuples CSV with header ``query,positive,cluster`` (relative paths resolve against ``root``,
    default the CSV's folder)."""
    path = Path(csv_path)
    if not path.is_file():
        raise DatasetError(f"pairs CSV {path} not found")
    base = Path(root) if root else path.parent
    qs, ps, cs = [], [], []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"query", "positive", "cluster"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(f"{path}: missing column(s) {sorted(missing)}; expected query,positive,cluster")
        for lineno, row in enumerate(reader, 2):
            try:
                cs.append(int(row["cluster"]))
            except (TypeError, ValueError):
                raise DatasetError(f"{path}:{lineno}: cluster {row['cluster']!r} is not an integer") from None
            qs.append(row["query"].strip())
            ps.append(row["positive"].strip())
    return _pairs_to_items([base / q for q in qs], [base / p for p in ps], cs, str(path),
                           ids=[(str(PurePosixPath(q).with_suffix("")), str(PurePosixPath(p).with_suffix("")))
                                for q, p in zip(qs, ps)])


def sfm120k_pickle(pkl_path: str | os.PathLike, root: str | os.PathLike, split: str = "train") -> LabelledImages:
    """cirtorch's SfM-120k pickle (layout from memory, unverified; see the module docstring)."""
    path = Path(pkl_path)
    if not path.is_file():
        raise DatasetError(f"SfM-120k pickle {path} not found")
    with open(path, "rb") as fh:
        db = pickle.load(fh)  # noqa: S301 - a dataset file the user chose, as cirtorch distributes it
    try:
        part = db[split]
        cids, cluster, qidxs, pidxs = part["cids"], part["cluster"], part["qidxs"], part["pidxs"]
    except (KeyError, TypeError) as exc:
        raise DatasetError(f"{path}: not the cirtorch SfM-120k layout (need db[{split!r}] with cids, "
                           f"cluster, qidxs, pidxs): {exc}") from None

    def file_of(cid: str) -> Path:
        return Path(root) / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid

    return _pairs_to_items([file_of(cids[i]) for i in qidxs], [file_of(cids[i]) for i in pidxs],
                           [int(cluster[i]) for i in qidxs], str(path),
                           ids=[(str(cids[q]), str(cids[p])) for q, p in zip(qidxs, pidxs)])


def load_labelled(source: str | os.PathLike, image_root: str | os.PathLike | None = None) -> LabelledImages:
    """Any layout of the module docstring: a folder (one per class), a GLDv2 or pairs ``.csv`` (told
    apart by the header; images under ``image_root``, default the CSV's folder), or an SfM-120k
    ``.pkl`` (needs ``image_root``)."""
    source = Path(source)
    if source.is_dir():
        return folder_per_class(source)
    suffix = source.suffix.lower()
    if source.is_file() and suffix == ".csv":
        with open(source, encoding="utf-8", newline="") as fh:
            header = [h.strip() for h in next(csv.reader(fh), [])]
        if "query" in header and "positive" in header:
            return pairs_csv(source, image_root)
        return gldv2_csv(source, image_root)
    if source.is_file() and suffix == ".pkl":
        if image_root is None:
            raise DatasetError(f"{source}: an SfM-120k pickle needs the image root (--image-root)")
        return sfm120k_pickle(source, image_root)
    raise DatasetError(f"{source}: expected a folder root/<class>/<images>, a GLDv2 or pairs .csv, "
                       "or an SfM-120k .pkl")


# ------------------------------------------------------------------------------------- helpers
def _landmark(value: str | None, path: Path, lineno: int) -> int:
    try:
        return int((value or "").strip())
    except ValueError:
        raise DatasetError(f"{path}:{lineno}: landmark_id {value!r} is not an integer") from None


def _check_unique(ids: Sequence[str], source: Path) -> None:
    seen: set[str] = set()
    for ident in ids:
        if ident in seen:
            raise DatasetError(f"{source}: image id {ident!r} appears twice")
        seen.add(ident)


def _pairs_to_items(queries: Sequence[Path], positives: Sequence[Path], clusters: Sequence[int], source: str,
                    ids: Sequence[tuple[str, str]]) -> LabelledImages:
    """Each image of the (query, positive) pairs once, in order of appearance, labelled by cluster."""
    index: dict[Path, int] = {}
    paths: list[Path] = []
    out_ids: list[str] = []
    raw: list[int] = []
    for q, p, c, pair_ids in zip(queries, positives, clusters, ids):
        for path, ident in zip((q, p), pair_ids):
            if path not in index:
                index[path] = len(paths)
                paths.append(path)
                out_ids.append(ident)
                raw.append(int(c))
            elif raw[index[path]] != int(c):
                raise DatasetError(f"{source}: image {path} is listed under clusters {raw[index[path]]} and {c}")
    if not paths:
        raise DatasetError(f"{source}: no pairs")
    uniq, labels = np.unique(np.asarray(raw), return_inverse=True)
    return LabelledImages(paths, labels, [str(u) for u in uniq.tolist()], ids=out_ids)

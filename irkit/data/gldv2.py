"""Google Landmarks Dataset v2 (GLDv2): training CSVs, the image layout and the retrieval solution.

Files (as distributed by the GLDv2 authors):

* ``train_clean.csv``: ``landmark_id,images`` with ``images`` = space-separated image ids;
* ``train.csv``: ``id,url,landmark_id``;
* ``index.csv`` / ``test.csv``: an ``id`` column (extra columns ignored);
* ``retrieval_solution_v2.1.csv``: ``id,images,Usage``; ``images`` = space-separated index ids
  relevant to the test query ``id``; ``Usage`` is ``Private``, ``Public`` or ``Ignored``.

Images live at ``<root>/<id[0]>/<id[1]>/<id[2]>/<id>.jpg``.
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from irkit.errors import DatasetError

log = logging.getLogger(__name__)

USAGES = ("Private", "Public", "Ignored")


def image_path(root: str | os.PathLike, image_id: str, ext: str = ".jpg") -> Path:
    """``<root>/a/b/c/<id>.jpg`` for id ``abc...``."""
    if not isinstance(image_id, str) or len(image_id) < 3 or not image_id.isalnum():
        raise DatasetError(f"invalid GLDv2 image id {image_id!r}: expected an alphanumeric id of 3+ characters")
    return Path(root) / image_id[0] / image_id[1] / image_id[2] / f"{image_id}{ext}"


@dataclass
class LabelledImages:
    """Training images with labels: ``labels`` are contiguous class indices into ``classes``
    (the original landmark ids, sorted), as a classification head needs."""

    ids: list[str]
    landmark_ids: np.ndarray          # [n] int64, original landmark id per image
    classes: np.ndarray               # [C] int64, sorted unique landmark ids
    labels: np.ndarray                # [n] int64 in [0, C)
    urls: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return int(self.classes.size)


def _open_csv(path: Path, required: tuple[str, ...]) -> tuple[csv.DictReader, TextIO]:
    if not path.is_file():
        raise DatasetError(f"GLDv2 file {path} not found")
    fh = open(path, encoding="utf-8", newline="")
    reader = csv.DictReader(fh)
    fields = [f.strip() for f in (reader.fieldnames or [])]
    missing = [c for c in required if c not in fields]
    if missing:
        fh.close()
        raise DatasetError(f"{path}: missing column(s) {missing}; found {fields}")
    reader.fieldnames = fields
    return reader, fh


def _landmark(value: str | None, path: Path, lineno: int) -> int:
    try:
        return int((value or "").strip())
    except ValueError:
        raise DatasetError(f"{path}:{lineno}: landmark_id {value!r} is not an integer") from None


def _labelled(ids: list[str], lms: list[int], urls: list[str], path: Path) -> LabelledImages:
    if not ids:
        raise DatasetError(f"{path} holds no images")
    seen: dict[str, int] = {}
    for i, ident in enumerate(ids):
        if ident in seen:
            raise DatasetError(f"{path}: image id {ident!r} appears twice")
        seen[ident] = i
    landmark_ids = np.asarray(lms, dtype=np.int64)
    classes, labels = np.unique(landmark_ids, return_inverse=True)
    log.info("%s: %d images, %d classes", path, len(ids), classes.size)
    return LabelledImages(ids=ids, landmark_ids=landmark_ids, classes=classes,
                          labels=labels.astype(np.int64), urls=urls)


def load_train_clean(csv_path: str | os.PathLike) -> LabelledImages:
    """``train_clean.csv``: one row per landmark with its space-separated image ids."""
    path = Path(csv_path)
    reader, fh = _open_csv(path, ("landmark_id", "images"))
    ids: list[str] = []
    lms: list[int] = []
    with fh:
        for lineno, row in enumerate(reader, 2):
            lm = _landmark(row["landmark_id"], path, lineno)
            imgs = (row["images"] or "").split()
            if not imgs:
                raise DatasetError(f"{path}:{lineno}: landmark {lm} lists no images")
            ids.extend(imgs)
            lms.extend([lm] * len(imgs))
    return _labelled(ids, lms, [], path)


def load_train_csv(csv_path: str | os.PathLike) -> LabelledImages:
    """``train.csv``: ``id,url,landmark_id`` per image."""
    path = Path(csv_path)
    reader, fh = _open_csv(path, ("id", "landmark_id"))
    ids: list[str] = []
    lms: list[int] = []
    urls: list[str] = []
    with fh:
        for lineno, row in enumerate(reader, 2):
            ident = (row["id"] or "").strip()
            if not ident:
                raise DatasetError(f"{path}:{lineno}: empty id")
            ids.append(ident)
            lms.append(_landmark(row["landmark_id"], path, lineno))
            urls.append((row.get("url") or "").strip())
    return _labelled(ids, lms, urls, path)


def load_image_ids(csv_path: str | os.PathLike) -> list[str]:
    """``index.csv`` / ``test.csv``: the ``id`` column, in file order (duplicates are an error)."""
    path = Path(csv_path)
    reader, fh = _open_csv(path, ("id",))
    ids: list[str] = []
    seen: set[str] = set()
    with fh:
        for lineno, row in enumerate(reader, 2):
            ident = (row["id"] or "").strip()
            if not ident:
                raise DatasetError(f"{path}:{lineno}: empty id")
            if ident in seen:
                raise DatasetError(f"{path}:{lineno}: id {ident!r} appears twice")
            seen.add(ident)
            ids.append(ident)
    return ids


@dataclass
class RetrievalSolution:
    """Relevant index ids and Usage per test query id."""

    relevant: dict[str, list[str]]
    usage: dict[str, str]

    def queries(self, split: str = "private") -> list[str]:
        """Query ids of a split: "private", "public", "all" (= private + public; never "Ignored")."""
        split = split.lower()
        wanted = {"private": {"Private"}, "public": {"Public"}, "all": {"Private", "Public"}}.get(split)
        if wanted is None:
            raise DatasetError(f"unknown GLDv2 split {split!r}; use 'private', 'public' or 'all'")
        return [q for q, u in self.usage.items() if u in wanted]


def load_retrieval_solution(csv_path: str | os.PathLike) -> RetrievalSolution:
    """The retrieval solution CSV (``id,images,Usage``). Ignored rows may list no images ("None")."""
    path = Path(csv_path)
    reader, fh = _open_csv(path, ("id", "images", "Usage"))
    relevant: dict[str, list[str]] = {}
    usage: dict[str, str] = {}
    with fh:
        for lineno, row in enumerate(reader, 2):
            qid = (row["id"] or "").strip()
            use = (row["Usage"] or "").strip().capitalize()
            if not qid:
                raise DatasetError(f"{path}:{lineno}: empty id")
            if qid in usage:
                raise DatasetError(f"{path}:{lineno}: query {qid!r} appears twice")
            if use not in USAGES:
                raise DatasetError(f"{path}:{lineno}: Usage {row['Usage']!r} is not one of {list(USAGES)}")
            imgs = [i for i in (row["images"] or "").split() if i != "None"]
            if use != "Ignored" and not imgs:
                raise DatasetError(f"{path}:{lineno}: {use} query {qid!r} has no relevant index images")
            relevant[qid] = imgs
            usage[qid] = use
    if not usage:
        raise DatasetError(f"{path} holds no queries")
    return RetrievalSolution(relevant=relevant, usage=usage)

"""Google Landmarks Dataset v2 (GLDv2): the image layout, index/test ids and the retrieval solution.

The training CSVs (``train_clean.csv``, ``train.csv``) are labelled data, read by
:func:`irkit.data.labelled.gldv2_csv` like every other labelled layout.

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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from irkit.errors import DatasetError

USAGES = ("Private", "Public", "Ignored")


def image_path(root: str | os.PathLike, image_id: str, ext: str = ".jpg") -> Path:
    """``<root>/a/b/c/<id>.jpg`` for id ``abc...``."""
    if not isinstance(image_id, str) or len(image_id) < 3 or not image_id.isalnum():
        raise DatasetError(f"invalid GLDv2 image id {image_id!r}: expected an alphanumeric id of 3+ characters")
    return Path(root) / image_id[0] / image_id[1] / image_id[2] / f"{image_id}{ext}"


def open_csv(path: Path, required: tuple[str, ...]) -> tuple[csv.DictReader, TextIO]:
    """A GLDv2 CSV open for reading (close the returned file), field names stripped; DatasetError
    naming the file when it is missing or lacks a ``required`` column."""
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


def load_image_ids(csv_path: str | os.PathLike) -> list[str]:
    """``index.csv`` / ``test.csv``: the ``id`` column, in file order (duplicates are an error)."""
    path = Path(csv_path)
    reader, fh = open_csv(path, ("id",))
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
    reader, fh = open_csv(path, ("id", "images", "Usage"))
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

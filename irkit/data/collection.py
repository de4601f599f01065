"""A user's own image collection, from a folder or a list file, with stable ids.

Ids are what a feature store keys on, so they must not depend on where the collection is mounted:

* folder: the path relative to the folder, posix separators, without the extension
  (``holidays/2019/img_001``); files are sorted by that relative path; hidden files and folders
  (name starting with ".") are skipped.
* ``.txt`` list: one path per line (blank lines and ``#`` comments skipped); relative paths are
  resolved against ``root`` (default: the list file's folder); id = the path as written, posix
  separators, without the extension.
* ``.csv`` list: a ``path`` column and an optional ``id`` column (else ids as for ``.txt``).

Two entries with the same id are an error (e.g. ``a.jpg`` and ``a.png`` in one folder).
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from irkit.errors import DatasetError
from irkit.io.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)


@dataclass
class Collection:
    """Ids and paths of a collection, in a stable order."""

    ids: list[str]
    paths: list[Path]

    def __len__(self) -> int:
        return len(self.ids)


def load_collection(source: str | os.PathLike, extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
                    recursive: bool = True, root: str | os.PathLike | None = None) -> Collection:
    """A folder (scanned) or a ``.txt``/``.csv`` list file; DatasetError when empty or ambiguous."""
    source = Path(source)
    if source.is_dir():
        return scan_folder(source, extensions, recursive)
    if not source.exists():
        raise DatasetError(f"collection {source} not found (give a folder or a .txt/.csv list file)")
    suffix = source.suffix.lower()
    if suffix == ".txt":
        return read_txt_list(source, root)
    if suffix == ".csv":
        return read_csv_list(source, root)
    raise DatasetError(f"collection {source}: unsupported list file type {suffix!r}; use a folder, .txt or .csv")


def _id_of(rel: str) -> str:
    p = PurePosixPath(rel.replace("\\", "/"))
    return str(p.with_suffix("")) if p.suffix else str(p)


def _check_unique(ids: list[str], paths: list[Path], source: Path) -> None:
    first: dict[str, int] = {}
    for i, ident in enumerate(ids):
        if ident in first:
            raise DatasetError(f"collection {source}: duplicate id {ident!r} for {paths[first[ident]]} and {paths[i]}; "
                               "rename one file (ids ignore the extension) or give explicit ids")
        first[ident] = i


def scan_folder(folder: str | os.PathLike, extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
                recursive: bool = True) -> Collection:
    """Every image file under ``folder`` (extension filter, case-insensitive), sorted by relative path."""
    folder = Path(folder)
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    rels: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")] if recursive else []
        base = Path(dirpath).relative_to(folder)
        for fname in filenames:
            if not fname.startswith(".") and os.path.splitext(fname)[1].lower() in exts:
                rels.append((base / fname).as_posix())
    rels.sort()
    if not rels:
        raise DatasetError(f"no images with extensions {sorted(exts)} found in {folder}"
                           f"{'' if recursive else ' (not recursive)'}")
    paths = [folder / r for r in rels]
    ids = [_id_of(r) for r in rels]
    _check_unique(ids, paths, folder)
    log.info("found %d images in %s", len(ids), folder)
    return Collection(ids=ids, paths=paths)


def _resolve(entry: str, base: Path) -> Path:
    p = Path(entry)
    return p if p.is_absolute() else base / p


def read_txt_list(list_file: str | os.PathLike, root: str | os.PathLike | None = None) -> Collection:
    """One image path per line."""
    list_file = Path(list_file)
    base = Path(root) if root is not None else list_file.parent
    entries = []
    with open(list_file, encoding="utf-8") as fh:
        for line in fh:
            s = line.strip()
            if s and not s.startswith("#"):
                entries.append(s)
    if not entries:
        raise DatasetError(f"collection list {list_file} has no entries")
    paths = [_resolve(e, base) for e in entries]
    ids = [_id_of(e) for e in entries]
    _check_unique(ids, paths, list_file)
    return Collection(ids=ids, paths=paths)


def read_csv_list(list_file: str | os.PathLike, root: str | os.PathLike | None = None) -> Collection:
    """A CSV with a ``path`` column and an optional ``id`` column."""
    list_file = Path(list_file)
    base = Path(root) if root is not None else list_file.parent
    with open(list_file, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if "path" not in fields:
            raise DatasetError(f"{list_file}: needs a 'path' column (optional 'id'), found columns {fields}")
        reader.fieldnames = fields
        ids, paths = [], []
        for lineno, row in enumerate(reader, 2):
            p = (row.get("path") or "").strip()
            if not p:
                raise DatasetError(f"{list_file}:{lineno}: empty 'path'")
            ident = (row.get("id") or "").strip() if "id" in fields else _id_of(p)
            if not ident:
                raise DatasetError(f"{list_file}:{lineno}: empty 'id' for {p!r}")
            ids.append(ident)
            paths.append(_resolve(p, base))
    if not ids:
        raise DatasetError(f"collection list {list_file} has no rows")
    _check_unique(ids, paths, list_file)
    return Collection(ids=ids, paths=paths)

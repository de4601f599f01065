"""The revisitop1m distractors (~1M images), appended after a revisitop database for "+1M" results.

A list file (``revisitop1m.txt``) holds one image name per line, relative to an image root. The
distractors are appended after the database, so database index ``i`` keeps its meaning and
distractor ``j`` becomes index ``n_db + j``: the ground truth needs no change.

Ids: the name without its extension, as a posix path (``"a/b/abc"``), so they are stable across
machines and list-file orderings.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from irkit.errors import DatasetError

log = logging.getLogger(__name__)


@dataclass
class DistractorSet:
    """Distractor names (as listed), their resolved paths and stable ids, in list-file order."""

    names: list[str]
    paths: list[Path]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.names)


def load_distractors(list_file: str | os.PathLike, image_root: str | os.PathLike, ext: str = ".jpg",
                     check_images: bool = False) -> DistractorSet:
    """Read a distractor list; names without an extension get ``ext``. DatasetError on bad entries.

    ``check_images`` stats every file (slow for 1M files on network storage; off by default).
    """
    list_file, image_root = Path(list_file), Path(image_root)
    if not list_file.is_file():
        raise DatasetError(f"distractor list {list_file} not found (e.g. revisitop1m.txt, one image name per line)")
    names, paths, ids, seen = [], [], [], {}
    with open(list_file, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            name = line.strip()
            if not name or name.startswith("#"):
                continue
            rel = PurePosixPath(name.replace("\\", "/"))
            if rel.is_absolute() or ".." in rel.parts:
                raise DatasetError(f"{list_file}:{lineno}: {name!r} must be a path relative to the image root")
            if not rel.suffix:
                rel = rel.with_name(rel.name + ext)
            ident = str(rel.with_suffix(""))
            if ident in seen:
                raise DatasetError(f"{list_file}:{lineno}: {name!r} duplicates line {seen[ident]} (same id {ident!r})")
            seen[ident] = lineno
            names.append(name)
            paths.append(image_root / rel)
            ids.append(ident)
    if not names:
        raise DatasetError(f"distractor list {list_file} is empty")
    if check_images:
        missing = [p for p in paths if not p.is_file()]
        if missing:
            shown = ", ".join(str(p) for p in missing[:5])
            raise DatasetError(f"{len(missing)} of {len(paths)} distractor images are missing under "
                               f"{image_root}, e.g. {shown}")
    log.info("loaded %d distractors from %s", len(names), list_file)
    return DistractorSet(names=names, paths=paths, ids=ids)


def combined_database(db_ids: list[str], db_paths: list[Path], distractors: DistractorSet,
                      ) -> tuple[list[str], list[Path]]:
    """Database followed by distractors: ``(ids, paths)``; ground-truth indices stay valid.

    Pass ``dataset.imlist`` and ``dataset.db_paths`` of a RevisitopDataset. An id shared by a
    database image and a distractor is an error (the rows would be indistinguishable in a store).
    """
    if len(db_ids) != len(db_paths):
        raise DatasetError(f"database has {len(db_ids)} ids but {len(db_paths)} paths")
    clash = set(db_ids).intersection(distractors.ids)
    if clash:
        raise DatasetError(f"{len(clash)} distractor id(s) equal database ids, e.g. {sorted(clash)[:3]}")
    return list(db_ids) + distractors.ids, list(db_paths) + distractors.paths

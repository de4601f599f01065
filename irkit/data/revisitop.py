"""Datasets in the revisitop layout (ROxford5k, RParis6k, and any other set laid out the same way).

Layout: ``<data_dir>/<name>/gnd_<name>.pkl`` and ``<data_dir>/<name>/jpg/<image>.jpg``. The pickle
holds ``imlist`` (database names without extension), ``qimlist`` (query names, not in the
database) and ``gnd`` (one dict per query: ``bbx`` [x1, y1, x2, y2] or None, ``easy``, ``hard``,
``junk`` = indices into ``imlist``). The file is validated here once, so the evaluator and the
extraction code can trust it. Only unpickle ground-truth files you trust.
"""
from __future__ import annotations

import logging
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from irkit.errors import DatasetError

log = logging.getLogger(__name__)

IMAGE_EXT = ".jpg"
INDEX_KEYS = ("easy", "hard", "junk")


def gnd_path(data_dir: str | os.PathLike, name: str) -> Path:
    """Where the ground truth of dataset ``name`` lives."""
    return Path(data_dir) / name / f"gnd_{name}.pkl"


def load_gnd(pkl_path: str | os.PathLike) -> dict:
    """Read and validate a revisitop ground-truth pickle.

    Returns ``{"imlist": list[str], "qimlist": list[str], "gnd": list[dict]}`` where each gnd entry
    has ``bbx`` (tuple of 4 floats, or None) and ``easy``/``hard``/``junk`` (lists of int); other
    keys of an entry are kept. Raises DatasetError naming the file and the first problem found.
    """
    path = Path(pkl_path)
    if not path.is_file():
        raise DatasetError(f"ground-truth file {path} not found (expected <data_dir>/<name>/gnd_<name>.pkl)")
    try:
        with open(path, "rb") as fh:
            raw = pickle.load(fh)
    except Exception as exc:  # any unpickling failure is a malformed file
        raise DatasetError(f"{path}: cannot be read as a pickle ({type(exc).__name__}: {exc})") from exc
    return validate_gnd(raw, str(path))


def validate_gnd(raw: Any, source: str = "<gnd>") -> dict:
    """Validate an already-unpickled ground-truth dict (see :func:`load_gnd`)."""
    if not isinstance(raw, dict):
        raise DatasetError(f"{source}: expected a dict with imlist/qimlist/gnd, got {type(raw).__name__}")
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in raw]
    if missing:
        raise DatasetError(f"{source}: missing key(s) {missing}; a revisitop gnd has imlist, qimlist and gnd")
    imlist = _names(raw["imlist"], "imlist", source)
    qimlist = _names(raw["qimlist"], "qimlist", source)
    entries = raw["gnd"]
    if not isinstance(entries, (list, tuple)):
        raise DatasetError(f"{source}: 'gnd' must be a list of per-query dicts, got {type(entries).__name__}")
    if len(entries) != len(qimlist):
        raise DatasetError(f"{source}: 'gnd' has {len(entries)} entries but 'qimlist' has {len(qimlist)} queries")
    n_db = len(imlist)
    gnd = [_entry(e, i, n_db, source) for i, e in enumerate(entries)]
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


def _names(value: Any, key: str, source: str) -> list[str]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise DatasetError(f"{source}: '{key}' must be a list of image names, got {type(value).__name__}")
    names = list(value)
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise DatasetError(f"{source}: '{key}' must hold non-empty strings, found {bad[0]!r}")
    return names


def _entry(e: Any, q: int, n_db: int, source: str) -> dict:
    where = f"{source}: gnd[{q}]"
    if not isinstance(e, dict):
        raise DatasetError(f"{where} must be a dict with bbx/easy/hard/junk, got {type(e).__name__}")
    missing = [k for k in ("bbx",) + INDEX_KEYS if k not in e]
    if missing:
        raise DatasetError(f"{where} is missing key(s) {missing}")
    out = dict(e)
    out["bbx"] = _bbx(e["bbx"], where)
    seen: dict[int, str] = {}
    for key in INDEX_KEYS:
        idx = _indices(e[key], f"{where}['{key}']", n_db)
        for i in idx:
            if i in seen:
                other = seen[i]
                what = "twice" if other == key else f"in both '{other}' and '{key}'"
                raise DatasetError(f"{where}: database index {i} appears {what}")
            seen[i] = key
        out[key] = idx
    return out


def _bbx(value: Any, where: str) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}['bbx'] must be 4 numbers [x1, y1, x2, y2], got {value!r}") from None
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise DatasetError(f"{where}['bbx'] must be 4 finite numbers [x1, y1, x2, y2], got {value!r}")
    if vals[2] <= vals[0] or vals[3] <= vals[1]:
        raise DatasetError(f"{where}['bbx'] = {list(vals)} is empty (need x2 > x1 and y2 > y1)")
    return vals  # type: ignore[return-value]


def _indices(value: Any, where: str, n_db: int) -> list[int]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise DatasetError(f"{where} must be a list of database indices, got {type(value).__name__}")
    out = []
    for v in value:
        if isinstance(v, bool) or not hasattr(v, "__index__"):
            raise DatasetError(f"{where} must hold integers, found {v!r}")
        i = int(v)
        if not 0 <= i < n_db:
            raise DatasetError(f"{where} holds index {i}, outside the database [0, {n_db})")
        out.append(i)
    return out


@dataclass
class RevisitopDataset:
    """A revisitop-layout dataset with resolved image paths; query images are cropped to ``query_bbx``."""

    name: str
    root: Path
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict]
    db_paths: list[Path] = field(default_factory=list)
    query_paths: list[Path] = field(default_factory=list)
    query_bbx: list[tuple[float, float, float, float] | None] = field(default_factory=list)

    @property
    def n_db(self) -> int:
        return len(self.imlist)

    @property
    def n_queries(self) -> int:
        return len(self.qimlist)


def load_revisitop(data_dir: str | os.PathLike, name: str, check_images: bool = True) -> RevisitopDataset:
    """Load dataset ``name`` from ``data_dir`` (revisitop layout); DatasetError on any problem.

    With ``check_images`` every database and query image must exist; the error names the first
    few missing files and how many are missing.
    """
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise DatasetError(f"invalid dataset name {name!r}: give the folder name, e.g. 'roxford5k'")
    data_dir = Path(data_dir)
    root = data_dir / name
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} not found; expected {data_dir}/{name}/gnd_{name}.pkl "
                           f"and {data_dir}/{name}/jpg/*.jpg (check --data-dir and the dataset name)")
    gnd = load_gnd(gnd_path(data_dir, name))
    jpg = root / "jpg"
    ds = RevisitopDataset(
        name=name, root=root, imlist=gnd["imlist"], qimlist=gnd["qimlist"], gnd=gnd["gnd"],
        db_paths=[jpg / f"{n}{IMAGE_EXT}" for n in gnd["imlist"]],
        query_paths=[jpg / f"{n}{IMAGE_EXT}" for n in gnd["qimlist"]],
        query_bbx=[g["bbx"] for g in gnd["gnd"]],
    )
    if check_images:
        missing = [p for p in ds.query_paths + ds.db_paths if not p.is_file()]
        if missing:
            shown = ", ".join(str(p) for p in missing[:5])
            raise DatasetError(f"{name}: {len(missing)} of {len(ds.query_paths) + len(ds.db_paths)} images are "
                               f"missing, e.g. {shown}; put them in {jpg}/ (or pass check_images=False)")
    log.info("loaded %s: %d database images, %d queries", name, ds.n_db, ds.n_queries)
    return ds

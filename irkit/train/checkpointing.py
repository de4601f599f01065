"""Training state on disk, shared by every trainer: ``out/checkpoints/step_N`` folders written
atomically (temp folder + rename), ``out/latest.json`` naming the newest, the exported inference
model copied to ``out/model.safetensors`` (+ ``.json``), old checkpoints pruned; and the metrics
CSVs, cut back to the checkpoint's step when a run resumes."""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from irkit.errors import CheckpointError
from irkit.utils import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

EXPORTED = ("model.safetensors", "model.json")


@contextlib.contextmanager
def write_checkpoint(out: Path, step: int, keep: int = 1) -> Iterator[Path]:
    """Yield an empty temporary folder to fill (it must hold ``model.safetensors``/``model.json``);
    when the block succeeds it becomes ``out/checkpoints/step_N`` and is published."""
    root = out / "checkpoints"
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_json(out / "latest.json", {"step": step, "path": final.name})
    for name in EXPORTED:
        with atomic_path(out / name) as t:
            shutil.copyfile(final / name, t)
    for old in sorted(root.glob("step_*"))[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint %s", final)


def latest_checkpoint(out: Path) -> Path | None:
    """The folder ``out/latest.json`` names, or None when there is no checkpoint yet."""
    latest = out / "latest.json"
    if not latest.is_file():
        return None
    folder = out / "checkpoints" / json.loads(latest.read_text())["path"]
    if not folder.is_dir():
        raise CheckpointError(f"{latest} names {folder}, which is missing; delete latest.json to restart")
    return folder


def append_csv(path: Path, row: dict[str, Any]) -> None:
    """Append ``row`` to a metrics CSV (header from the first row written)."""
    header = None
    if path.is_file():
        with open(path, newline="") as fh:
            header = next(csv.reader(fh), None)
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header or list(row), extrasaction="ignore")
        if not header:
            writer.writeheader()
        writer.writerow(row)


def truncate_csv(path: Path, step: int) -> None:
    """Drop rows logged after ``step`` (they belong to the interrupted part of a resumed run)."""
    if not path.is_file():
        return
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(float(r[0])) <= step]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            csv.writer(fh).writerows(kept)

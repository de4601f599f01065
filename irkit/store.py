"""FeatureStore: global descriptors (+ optional re-rank maps) of a collection, in one directory.

Why this layout: extraction of a million images takes hours and gets killed. Every ``add`` writes
its chunk files atomically (temp file + rename), then atomically rewrites a small manifest that
lists the committed chunks. The manifest is the only source of truth, so a ``kill -9`` at any
moment leaves either the old or the new manifest: nothing committed is lost, nothing half-written
is visible, and files the manifest does not name are orphans, deleted when a writer next opens.

Layout of ``STORE_DIR``::

    manifest.json          model, config (+ sha256), dim, dtype, chunk list, tombstones
    chunk-<uid>.npy        descriptors of one batch (or of a compacted run), [n, dim] fp16/fp32
    chunk-<uid>.json       ids, paths and re-rank map locations of the same rows
    maps.bin               append-only re-rank maps; the manifest records its committed length
    failures.jsonl         images skipped during extraction (id, path, reason, time)
    .lock                  flock held by the (single) writing process

Rows are numbered 0..N-1 in chunk order, skipping removed rows; ``remove`` only records
tombstones (atomic, cheap); ``compact`` rewrites everything into one contiguous chunk so that a
large store reads as a single memory map. Index files built from a store refer to these row
numbers and record ``uid``/``generation`` to detect that the store changed since.
"""
from __future__ import annotations

import bisect
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from irkit.errors import ConfigError, StoreError
from irkit.utils import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAPS_FILE = "maps.bin"
FAILURES_FILE = "failures.jsonl"
LOCK_FILE = ".lock"
DTYPES = ("float16", "float32")
#: above this many chunks, ``add`` merges the newest small chunks (size-tiered, amortised O(N log N))
DEFAULT_MAX_CHUNKS = 256


def config_hash(config: dict) -> str:
    """sha256 of the canonical JSON of ``config`` (sorted keys, no spaces), so equal configs match."""
    try:
        text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"store config must be plain JSON (dicts, lists, str, numbers, bools): {exc}") from exc
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _check_dtype(dtype: str) -> str:
    dtype = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if dtype not in DTYPES:
        raise ConfigError(f"store dtype must be one of {DTYPES}, got {dtype!r}")
    return dtype


class _Chunk:
    """One committed chunk: its descriptors (memory-mapped lazily) and row metadata."""

    def __init__(self, root: Path, entry: dict):
        self.root = root
        self.name: str = entry["name"]
        self.n: int = int(entry["n"])
        self.deleted: list[int] = sorted(int(i) for i in entry.get("deleted", []))
        rows = json.loads((root / f"{self.name}.json").read_text(encoding="utf-8"))
        self.ids: list[str] = rows["ids"]
        self.paths: list[str] = rows["paths"]
        self.maps: list[list[int]] | None = rows.get("maps")  # [offset, C, h, w] per row
        if len(self.ids) != self.n or len(self.paths) != self.n:
            raise StoreError(f"store chunk {root / self.name}.json lists {len(self.ids)} ids for {self.n} rows; "
                             "the store is corrupt (restore it or re-extract)")
        self._desc: np.ndarray | None = None
        self._live: np.ndarray | None = None

    def entry(self) -> dict:
        return {"name": self.name, "n": self.n, "deleted": list(self.deleted)}

    @property
    def desc(self) -> np.ndarray:
        if self._desc is None:
            path = self.root / f"{self.name}.npy"
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise StoreError(f"cannot read store chunk {path}: {exc}; the store is corrupt") from exc
            if arr.shape[0] != self.n:
                raise StoreError(f"store chunk {path} has {arr.shape[0]} rows, manifest says {self.n}")
            self._desc = arr
        return self._desc

    @property
    def live(self) -> np.ndarray:
        """Local indices of rows not removed."""
        if self._live is None:
            keep = np.ones(self.n, dtype=bool)
            keep[self.deleted] = False
            self._live = np.flatnonzero(keep)
        return self._live

    @property
    def n_live(self) -> int:
        return self.n - len(self.deleted)


class FeatureStore:
    """Descriptors, ids, paths and provenance of one extraction run; see the module docstring."""

    def __init__(self, root: Path, manifest: dict, *, max_chunks: int = DEFAULT_MAX_CHUNKS):
        self.root = Path(root)
        self._manifest = manifest
        self.max_chunks = max_chunks
        self._lock = threading.RLock()
        self._lock_fh: Any = None
        self._cache: np.ndarray | None = None
        self._maps_mm: np.ndarray | None = None
        self._load_chunks()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike, *, max_chunks: int = DEFAULT_MAX_CHUNKS) -> "FeatureStore":
        """Open an existing store (read; the first write takes the writer lock)."""
        root = Path(path)
        manifest = cls._read_manifest(root)
        if manifest is None:
            raise StoreError(f"{root} is not a feature store (no {MANIFEST}); extract features into it first")
        return cls(root, manifest, max_chunks=max_chunks)

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, *, model: str, config: dict, dim: int,
                       dtype: str = "float16", max_chunks: int = DEFAULT_MAX_CHUNKS) -> "FeatureStore":
        """Open the store at ``path`` if it matches (model, config hash, dim, dtype), else create it.

        Refuses with StoreError to mix descriptors of another model/config/dim/dtype in one store.
        """
        root = Path(path)
        dtype = _check_dtype(dtype)
        if int(dim) <= 0:
            raise ConfigError(f"descriptor dim must be positive, got {dim}")
        chash = config_hash(config)
        manifest = cls._read_manifest(root)
        if manifest is not None:
            want = {"model": model, "config_hash": chash, "dim": int(dim), "dtype": dtype}
            for key, value in want.items():
                if manifest[key] != value:
                    raise StoreError(
                        f"store {root} holds {key}={manifest[key]!r} but this run has {key}={value!r}; "
                        "descriptors of different models/configs cannot be mixed: use another store "
                        "directory (or delete this one)")
            return cls(root, manifest, max_chunks=max_chunks)
        if root.exists() and not root.is_dir():
            raise StoreError(f"store path {root} exists and is not a directory")
        root.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": "irkit-feature-store", "version": FORMAT_VERSION, "uid": uuid.uuid4().hex,
            "model": model, "config": json.loads(json.dumps(config)), "config_hash": chash,
            "dim": int(dim), "dtype": dtype, "generation": 0, "chunks": [],
            "has_maps": None, "map_channels": None, "maps_bytes": 0, "created": time.time(),
        }
        store = cls(root, manifest, max_chunks=max_chunks)
        store._acquire_writer()
        if cls._read_manifest(root) is not None:  # another process created it meanwhile
            store.close(compact=False)
            return cls.open_or_create(root, model=model, config=config, dim=dim, dtype=dtype,
                                      max_chunks=max_chunks)
        store._commit()
        log.info("created feature store %s (model %s, dim %d, %s)", root, model, dim, dtype)
        return store

    @staticmethod
    def _read_manifest(root: Path) -> dict | None:
        path = root / MANIFEST
        if not path.exists():
            return None
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read {path}: {exc}; the store is corrupt") from exc
        if manifest.get("format") != "irkit-feature-store":
            raise StoreError(f"{path} is not an irkit feature store manifest")
        if manifest.get("version", 0) > FORMAT_VERSION:
            raise StoreError(f"store {root} has format version {manifest['version']}; upgrade irkit to read it")
        return manifest

    def _load_chunks(self) -> None:
        self._chunks = [_Chunk(self.root, e) for e in self._manifest["chunks"]]
        self._reindex()

    def _reindex(self) -> None:
        self._starts: list[int] = []
        ids: list[str] = []
        paths: list[str] = []
        total = 0
        for ch in self._chunks:
            self._starts.append(total)
            live = ch.live
            if len(live) == ch.n:
                ids.extend(ch.ids)
                paths.extend(ch.paths)
            else:
                ids.extend(ch.ids[i] for i in live)
                paths.extend(ch.paths[i] for i in live)
            total += len(live)
        self._ids, self._paths, self._n = ids, paths, total
        self._pos = {s: i for i, s in enumerate(ids)}
        self._cache = None

    # ------------------------------------------------------------------ writer lock + recovery
    def _acquire_writer(self) -> None:
        """Take the inter-process writer lock, re-read the manifest and clean orphans left by a crash."""
        if self._lock_fh is not None:
            return
        fh = open(self.root / LOCK_FILE, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.close()
            raise StoreError(f"store {self.root} is being written by another process; "
                             "wait for it to finish (one writer per store)") from exc
        self._lock_fh = fh
        manifest = self._read_manifest(self.root)
        if manifest is not None and manifest.get("uid") == self._manifest.get("uid"):
            if manifest.get("generation") != self._manifest.get("generation") or \
                    manifest["chunks"] != self._manifest["chunks"]:
                self._manifest = manifest
                self._load_chunks()
        self._recover()

    def _recover(self) -> None:
        keep = {f"{c.name}{ext}" for c in self._chunks for ext in (".npy", ".json")}
        removed = 0
        for p in self.root.iterdir():
            name = p.name
            orphan = (name.startswith("chunk-") and name not in keep) or \
                (name.startswith((".chunk-", f".{MANIFEST}.")) and name.endswith(".tmp"))
            if orphan and p.is_file():
                p.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.warning("store %s: removed %d orphan file(s) left by an interrupted write", self.root, removed)
        maps = self.root / MAPS_FILE
        committed = int(self._manifest.get("maps_bytes", 0))
        if maps.exists() and maps.stat().st_size > committed:
            log.warning("store %s: truncating %s to its committed %d bytes", self.root, MAPS_FILE, committed)
            with open(maps, "r+b") as fh:
                fh.truncate(committed)
            self._maps_mm = None

    def refresh(self) -> bool:
        """Re-read the manifest (e.g. a reader following a writer in another process); True if it changed."""
        with self._lock:
            manifest = self._read_manifest(self.root)
            if manifest is None or (manifest.get("generation") == self.generation
                                    and manifest["chunks"] == self._manifest["chunks"]):
                return False
            self._manifest = manifest
            self._load_chunks()
            self._maps_mm = None
            return True

    def _commit(self) -> None:
        self._manifest["chunks"] = [c.entry() for c in self._chunks]
        self._manifest["n"] = self._n
        atomic_write_json(self.root / MANIFEST, self._manifest)
        _fsync_dir(self.root)

    def close(self, compact: bool = True) -> None:
        """Finish writing: merge chunks into one (if any writes happened) and release the writer lock."""
        with self._lock:
            if self._lock_fh is not None:
                if compact and len(self._chunks) > 1:
                    self.compact()
                fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_UN)
                self._lock_fh.close()
                self._lock_fh = None

    finalize = close

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(compact=exc[0] is None)

    # ------------------------------------------------------------------ properties
    @property
    def meta(self) -> dict:
        """Provenance: model, config, config_hash, dim, dtype, uid, generation, n, has_maps, ..."""
        m = {k: v for k, v in self._manifest.items() if k != "chunks"}
        m["n"] = self._n
        return json.loads(json.dumps(m))

    @property
    def dim(self) -> int:
        return int(self._manifest["dim"])

    @property
    def dtype(self) -> str:
        return self._manifest["dtype"]

    @property
    def uid(self) -> str:
        return self._manifest["uid"]

    @property
    def generation(self) -> int:
        """Incremented by every add/remove (not by compaction): index files use it to detect staleness."""
        return int(self._manifest["generation"])

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    @property
    def paths(self) -> list[str]:
        return list(self._paths)

    @property
    def has_maps(self) -> bool:
        return bool(self._manifest.get("has_maps"))

    @property
    def num_chunks(self) -> int:
        return len(self._chunks)

    def __len__(self) -> int:
        return self._n

    def __contains__(self, id_: object) -> bool:
        return id_ in self._pos

    def index_of(self, id_: str) -> int:
        try:
            return self._pos[id_]
        except KeyError:
            raise StoreError(f"id {id_!r} is not in store {self.root}") from None

    def missing(self, ids: Iterable[str]) -> list[str]:
        """The ids not yet in the store, in the given order: what a resumed extraction still has to do."""
        return [i for i in ids if i not in self._pos]

    def __repr__(self) -> str:
        return (f"FeatureStore({str(self.root)!r}, n={self._n}, dim={self.dim}, dtype={self.dtype}, "
                f"model={self._manifest['model']!r}, chunks={len(self._chunks)})")

    # ------------------------------------------------------------------ writing
    def add(self, ids: Sequence[str], paths: Sequence[str], descriptors: np.ndarray,
            maps: Sequence[np.ndarray] | None = None, *, skip_existing: bool = False) -> int:
        """Append one batch durably; returns the number of rows added.

        An id already in the store raises StoreError, unless ``skip_existing`` (then it is dropped).
        """
        ids = [str(i) for i in ids]
        paths = [str(p) for p in paths]
        desc = np.asarray(descriptors)
        if desc.ndim != 2 or desc.shape[1] != self.dim:
            raise StoreError(f"descriptors must have shape [n, {self.dim}], got {tuple(desc.shape)}")
        if not (len(ids) == len(paths) == desc.shape[0]):
            raise StoreError(f"add got {len(ids)} ids, {len(paths)} paths and {desc.shape[0]} descriptors; "
                             "they must match")
        if maps is not None and len(maps) != len(ids):
            raise StoreError(f"add got {len(maps)} maps for {len(ids)} ids")
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise StoreError(f"duplicate ids within one batch: {dup}")
        if any(not i for i in ids):
            raise StoreError("ids must be non-empty strings")
        with self._lock:
            self._acquire_writer()
            present = [k for k, i in enumerate(ids) if i in self._pos]
            if present:
                if not skip_existing:
                    shown = [ids[k] for k in present[:5]]
                    raise StoreError(f"{len(present)} id(s) already in store {self.root}, e.g. {shown}; "
                                     "use skip_existing=True or store.missing(ids) to resume")
                keep = np.setdiff1d(np.arange(len(ids)), present)
                ids = [ids[k] for k in keep]
                paths = [paths[k] for k in keep]
                desc = desc[keep]
                maps = [maps[k] for k in keep] if maps is not None else None
            if not ids:
                return 0
            out = desc.astype(self.dtype, copy=False)
            if not np.isfinite(out).all():
                raise StoreError(f"descriptors contain NaN/inf (after conversion to {self.dtype}); "
                                 "check the model output / normalisation")
            self._check_maps(maps)
            name = f"chunk-{uuid.uuid4().hex}"
            rows: dict[str, Any] = {"ids": ids, "paths": paths}
            maps_end = int(self._manifest.get("maps_bytes", 0))
            try:
                if maps is not None:
                    rows["maps"], maps_end = self._append_maps(maps)
                with atomic_path(self.root / f"{name}.npy", suffix=".tmp") as tmp:
                    with open(tmp, "wb") as fh:
                        np.save(fh, np.ascontiguousarray(out))
                with atomic_path(self.root / f"{name}.json", suffix=".tmp") as tmp:
                    tmp.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
            except OSError:   # e.g. ENOSPC: nothing was committed; give the space back, keep the errno
                self._discard_uncommitted(name)
                raise
            chunk = _Chunk(self.root, {"name": name, "n": len(ids)})
            self._chunks.append(chunk)
            self._manifest["generation"] = self.generation + 1
            self._manifest["maps_bytes"] = maps_end
            if maps is not None:
                self._manifest["has_maps"] = True
                self._manifest["map_channels"] = int(maps[0].shape[0])
            elif self._manifest.get("has_maps") is None:
                self._manifest["has_maps"] = False
            base = self._n
            self._starts.append(base)
            self._ids.extend(ids)
            self._paths.extend(paths)
            self._pos.update((s, base + k) for k, s in enumerate(ids))
            self._n += len(ids)
            self._cache = None
            try:
                self._commit()
            except BaseException:
                self._chunks.pop()
                self._manifest = self._read_manifest(self.root) or self._manifest
                self._load_chunks()
                self._discard_uncommitted(name)
                raise
            if len(self._chunks) > self.max_chunks:
                try:
                    self._merge_tail()
                except OSError as exc:   # the add is committed; a merge is only an optimisation
                    log.warning("store %s: merging chunks failed (%s); the add is kept, merge retried later",
                                self.root, exc)
                    self._manifest = self._read_manifest(self.root) or self._manifest
                    self._load_chunks()
            return len(ids)

    def _discard_uncommitted(self, name: str) -> None:
        """Remove the files of chunk ``name`` and maps past the committed length (a failed add's leftovers).

        Best effort and silent: on a full disk they are the space the next add needs, and what
        cannot be removed now is removed as an orphan when a writer next opens the store."""
        for ext in (".npy", ".json"):
            try:
                (self.root / f"{name}{ext}").unlink(missing_ok=True)
            except OSError:
                pass
        maps = self.root / MAPS_FILE
        committed = int(self._manifest.get("maps_bytes", 0))
        try:
            if maps.exists() and maps.stat().st_size > committed:
                with open(maps, "r+b") as fh:
                    fh.truncate(committed)
        except OSError:
            pass
        self._maps_mm = None

    def _check_maps(self, maps: Sequence[np.ndarray] | None) -> None:
        has = self._manifest.get("has_maps")
        if maps is None:
            if has:
                raise StoreError(f"store {self.root} stores re-rank maps for every image; this batch has none")
            return
        if has is False:
            raise StoreError(f"store {self.root} was created without re-rank maps; this batch has maps "
                             "(extract into a new store to keep maps)")
        channels = self._manifest.get("map_channels")
        for m in maps:
            if np.ndim(m) != 3:
                raise StoreError(f"re-rank maps must be [C, h, w], got shape {np.shape(m)}")
            c = channels if channels is not None else int(np.shape(maps[0])[0])
            if np.shape(m)[0] != c:
                raise StoreError(f"re-rank maps must all have {c} channels, got {np.shape(m)[0]}")
            if not np.isfinite(m).all():
                raise StoreError("re-rank maps contain NaN/inf")

    def _append_maps(self, maps: Sequence[np.ndarray]) -> tuple[list[list[int]], int]:
        """Append maps to maps.bin and fsync; bytes past the manifest's maps_bytes are uncommitted."""
        path = self.root / MAPS_FILE
        offset = int(self._manifest.get("maps_bytes", 0))
        locs = []
        with open(path, "ab") as fh:
            if fh.tell() != offset:  # leftovers of a failed add in this process
                fh.truncate(offset)
                fh.seek(offset)
            for m in maps:
                arr = np.ascontiguousarray(m, dtype=self.dtype)
                locs.append([offset, *map(int, arr.shape)])
                fh.write(arr.tobytes())
                offset += arr.nbytes
            fh.flush()
            os.fsync(fh.fileno())
        self._maps_mm = None
        return locs, offset

    def remove(self, ids: Iterable[str], *, missing_ok: bool = False) -> int:
        """Remove rows by id (tombstones in the manifest, one atomic write); returns how many were removed.

        Row numbers after the removed rows shift down, so an index built before is stale.
        """
        ids = list(dict.fromkeys(str(i) for i in ids))
        with self._lock:
            self._acquire_writer()
            unknown = [i for i in ids if i not in self._pos]
            if unknown and not missing_ok:
                raise StoreError(f"{len(unknown)} id(s) not in store {self.root}, e.g. {unknown[:5]}")
            rows = sorted(self._pos[i] for i in ids if i in self._pos)
            if not rows:
                return 0
            located = [self._locate(r) for r in rows]  # all before any change: n_live shifts as rows go
            for c, local in located:
                self._chunks[c].deleted.append(int(local))
            for ch in self._chunks:
                ch.deleted.sort()
                ch._live = None
            self._manifest["generation"] = self.generation + 1
            self._reindex()
            try:
                self._commit()
            except BaseException:  # e.g. ENOSPC: nothing was removed on disk, so nothing is in memory
                self._manifest = self._read_manifest(self.root) or self._manifest
                self._load_chunks()
                raise
            log.info("store %s: removed %d row(s)", self.root, len(rows))
            return len(rows)

    # ------------------------------------------------------------------ compaction
    def compact(self) -> None:
        """Merge all chunks (dropping removed rows) into one contiguous chunk, atomically."""
        with self._lock:
            self._acquire_writer()
            if len(self._chunks) <= 1 and not any(c.deleted for c in self._chunks):
                return
            self._merge(0)

    def _merge_tail(self) -> None:
        """Size-tiered merge of the newest chunks (each row is rewritten O(log N) times in total).

        Walk back from the newest chunk while the older chunk is no larger than what is gathered so
        far, so a big compacted base is not rewritten for every few small batches.
        """
        sizes = [c.n for c in self._chunks]
        start, total = len(sizes) - 1, sizes[-1]
        while start > 0 and sizes[start - 1] <= total:
            start -= 1
            total += sizes[start]
        start = min(start, len(sizes) - max(2, self.max_chunks // 2))
        self._merge(max(0, start))

    def _merge(self, start: int) -> None:
        old = self._chunks[start:]
        n = sum(c.n_live for c in old)
        name = f"chunk-{uuid.uuid4().hex}"
        rows: dict[str, Any] = {"ids": [], "paths": []}
        if any(c.maps is not None for c in old):
            rows["maps"] = []
        with atomic_path(self.root / f"{name}.npy", suffix=".tmp") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype, shape=(n, self.dim))
            pos = 0
            for c in old:
                live = c.live
                step = 65536
                for s in range(0, len(live), step):
                    sel = live[s:s + step]
                    block = c.desc[sel[0]:sel[-1] + 1] if len(sel) == sel[-1] - sel[0] + 1 else c.desc[sel]
                    out[pos:pos + len(sel)] = block
                    pos += len(sel)
                rows["ids"].extend(c.ids[i] for i in live)
                rows["paths"].extend(c.paths[i] for i in live)
                if "maps" in rows:
                    rows["maps"].extend(c.maps[i] for i in live)
            out.flush()
            del out
        with atomic_path(self.root / f"{name}.json", suffix=".tmp") as tmp:
            tmp.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
        self._chunks = self._chunks[:start] + [_Chunk(self.root, {"name": name, "n": n})]
        self._reindex()
        self._commit()
        for c in old:
            c._desc = None
            for ext in (".npy", ".json"):
                (self.root / f"{c.name}{ext}").unlink(missing_ok=True)
        log.info("store %s: merged %d chunk(s) into one of %d rows", self.root, len(old), n)

    # ------------------------------------------------------------------ reading
    def _locate(self, row: int) -> tuple[int, int]:
        """(chunk index, local row in that chunk's file) of logical row ``row``."""
        if not 0 <= row < self._n:
            raise IndexError(f"row {row} out of range for a store of {self._n} rows")
        c = bisect.bisect_right(self._starts, row) - 1
        while self._chunks[c].n_live == 0 or row - self._starts[c] >= self._chunks[c].n_live:
            c += 1
        return c, int(self._chunks[c].live[row - self._starts[c]])

    def descriptors(self) -> np.ndarray:
        """All descriptors as a read-only [N, dim] float32 array.

        A compacted float32 store returns its memory map directly (no copy); otherwise the float32
        copy is built once and cached until the next add/remove. Use ``iter_descriptors`` to stream.
        """
        with self._lock:
            if self._cache is not None:
                return self._cache
            if len(self._chunks) == 1 and not self._chunks[0].deleted and self.dtype == "float32":
                arr = self._chunks[0].desc
            else:
                arr = np.empty((self._n, self.dim), dtype=np.float32)
                for start, block in self.iter_descriptors():
                    arr[start:start + len(block)] = block
                arr.flags.writeable = False
            self._cache = arr
            return arr

    def iter_descriptors(self, batch_size: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first row, float32 block) over all rows with bounded memory (from the memory maps)."""
        with self._lock:
            chunks, starts = list(self._chunks), list(self._starts)
        for c, start in zip(chunks, starts):
            live = c.live
            for s in range(0, len(live), batch_size):
                sel = live[s:s + batch_size]
                if len(sel) == sel[-1] - sel[0] + 1:
                    block = c.desc[sel[0]:sel[-1] + 1]
                else:
                    block = c.desc[sel]
                yield start + s, np.asarray(block, dtype=np.float32)

    def take(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Descriptors of the given logical rows as float32 [len(rows), dim] (gathers from the memmaps)."""
        rows = np.asarray(rows, dtype=np.int64).ravel()
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        if len(rows) == 0:
            return out
        if rows.min() < 0 or rows.max() >= self._n:
            raise IndexError(f"rows out of range for a store of {self._n} rows")
        with self._lock:
            starts = np.asarray(self._starts + [self._n])
            cidx = np.searchsorted(starts, rows, side="right") - 1
            for c in np.unique(cidx):
                ch = self._chunks[c]
                mask = cidx == c
                local = ch.live[rows[mask] - starts[c]]
                order = np.argsort(local, kind="stable")
                block = np.empty((len(local), self.dim), dtype=np.float32)
                block[order] = ch.desc[local[order]]
                out[mask] = block
        return out

    def get_map(self, i: int) -> np.ndarray:
        """Re-rank feature map [C, h, w] float32 of row ``i`` (read from the memory-mapped maps.bin)."""
        if not self.has_maps:
            raise StoreError(f"store {self.root} has no re-rank maps; extract with maps enabled")
        with self._lock:
            c, local = self._locate(int(i))
            offset, *shape = self._chunks[c].maps[local]
            if self._maps_mm is None or self._maps_mm.size < int(self._manifest["maps_bytes"]):
                self._maps_mm = np.memmap(self.root / MAPS_FILE, dtype=np.uint8, mode="r",
                                          shape=(int(self._manifest["maps_bytes"]),))
            nbytes = int(np.prod(shape)) * np.dtype(self.dtype).itemsize
            raw = self._maps_mm[offset:offset + nbytes]
        return raw.view(self.dtype).reshape(shape).astype(np.float32)

    # ------------------------------------------------------------------ failures
    def log_failure(self, id: str, path: str, reason: str) -> None:
        """Record an image skipped during extraction (one JSON line, appended and fsynced).

        The ``id`` is part of the record because a resumed run and a distributed merge match
        failures to the images they expected by id (paths may differ between machines)."""
        if not isinstance(id, str) or not id:
            raise StoreError(f"a failure record needs the image's id (got {id!r} for {path!r})")
        line = json.dumps({"id": id, "path": str(path), "reason": str(reason), "time": time.time()},
                          ensure_ascii=False)
        with self._lock:
            with open(self.root / FAILURES_FILE, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    @property
    def failures(self) -> list[dict]:
        """Images that failed and are not in the store: one record ``{id, path, reason, time}`` per
        id (the latest; a retried image fails again), in the order first logged. An image that a
        later run extracted is no longer listed; a line torn by a crash is skipped; records of
        stores written before ids were logged have ``id`` None and are keyed by path."""
        path = self.root / FAILURES_FILE
        if not path.exists():
            return []
        latest: dict[tuple[str, str], dict] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict):
                continue
            rec.setdefault("id", None)
            key = ("id", rec["id"]) if rec["id"] is not None else ("path", str(rec.get("path")))
            latest[key] = rec if key not in latest else {**latest[key], **rec}
        return [r for r in latest.values() if r["id"] is None or r["id"] not in self]

"""Near-duplicate finding: pairs of images whose global descriptors are almost equal, grouped.

Why through the index and not a similarity matrix: an N x N matrix is 40 GB at 100k images. Each
image instead asks the faiss index (:class:`irkit.search.index.Index`: exact ``Flat`` up to
``FLAT_MAX_ROWS`` images, ``IVF,Flat`` with exact scores past that) for its k nearest neighbours;
an image whose k-th neighbour still passes the threshold (a large group of copies) asks again with
a larger k, so no neighbour above the threshold is cut off by k. The pairs are joined into groups
(connected components, union-find by label propagation), and each group keeps its best-quality
member (the largest resolution, then the largest file); the rest is the "to remove" list.

Optional spatial verification (``verify=True``) decides only the borderline pairs, those within
``margin`` of the threshold: such a pair is kept when SIFT matches agree on one *similarity*
transform (scale, rotation, shift: what resizing, cropping and light edits do) with at least
``min_inliers`` inliers making at least ``min_inlier_ratio`` of the mutual matches. On the planted
set of bench/dedup.py every copy had a ratio >= 0.95, while two photos of one landmark or two frames
of one video (whose global descriptors pass 0.9 just as often) mostly stay under 0.85: a viewpoint
change is not a similarity, so many matches fall outside it. It rescues crops and re-encodings that
fall just under the threshold and drops such lookalikes that pass it.
"""
from __future__ import annotations

import hashlib
import html
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from irkit.errors import ConfigError, ImageError, StoreError
from irkit.eval.report import figure_html, write_thumbnail
from irkit.search.index import Index
from irkit.utils import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.9
DEFAULT_MODEL = "effnetlite2-gem"
#: duplicates need no multi-scale descriptor: one scale is 3x faster at the same recall (bench/dedup.py)
DEFAULT_SCALES = (1.0,)
#: up to this many images the neighbours are exact (Flat); above, IVF with exact scores
FLAT_MAX_ROWS = 20000
PCA_DIM = 128
DEFAULT_K = 16
DEFAULT_MARGIN = 0.05
DEFAULT_MIN_INLIERS = 8
DEFAULT_MIN_INLIER_RATIO = 0.9
MAX_HTML_GROUPS = 500


def check_threshold(threshold: float, name: str = "threshold") -> float:
    """A cosine-similarity threshold must lie in (0, 1]; ConfigError otherwise."""
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number in (0, 1], got {threshold!r}") from None
    if not math.isfinite(t) or t <= 0 or t > 1:
        raise ConfigError(f"{name} must be a cosine similarity in (0, 1] (e.g. 0.9), got {threshold!r}")
    return t


# --------------------------------------------------------------------------------------------
# pairs and groups
# --------------------------------------------------------------------------------------------
def auto_factory(n: int, dim: int) -> tuple[str, int | None, int | None]:
    """(factory, nprobe, train_size) for finding the neighbours of all N rows.

    Exact ``Flat`` up to ``FLAT_MAX_ROWS``. Past that, an IVF over a PCA-128 projection: scanning
    inverted lists is not BLAS, so its cost is N x nprobe x N/nlist x D and a smaller D is what
    pays (100k x 1280-D: ~45 s with PCA128 on this loaded 2-core machine, ~3x that without); a
    projection only shrinks distances, so near-duplicates stay neighbours, and every candidate's
    score is then recomputed exactly from the full vectors (``rescore``)."""
    if n <= FLAT_MAX_ROWS:
        return "Flat", None, None
    nlist = 1 << int(round(math.log2(2 * math.sqrt(n))))
    pca = f"PCA{PCA_DIM}," if dim > PCA_DIM else ""
    return f"{pca}IVF{nlist},Flat", 8, 40 * nlist


def _dedup_index(descriptors: np.ndarray, factory: str | None, nprobe: int | None,
                 progress: bool) -> Index:
    train_size = None
    if factory is None:
        factory, auto_nprobe, train_size = auto_factory(*descriptors.shape)
        nprobe = nprobe or auto_nprobe
    return Index.build(descriptors, factory, nprobe=nprobe, train_size=train_size, progress=progress)


def find_pairs(descriptors: np.ndarray, threshold: float = DEFAULT_THRESHOLD, *, k: int = DEFAULT_K,
               factory: str | None = None, nprobe: int | None = None, batch_size: int = 4096,
               progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (a, b, score) with a < b and score >= ``threshold``, from k-NN searches of the index.

    ``descriptors``: [N, D] L2-normalised. Rows whose k-th neighbour passes the threshold are
    searched again with 4x k until it does not (or k reaches N), so big groups are complete.
    ``factory``/``nprobe`` override the automatic choice (Flat up to ``FLAT_MAX_ROWS``, else IVF).
    """
    threshold = check_threshold(threshold)
    x = np.ascontiguousarray(descriptors, dtype=np.float32)
    if x.ndim != 2:
        raise ConfigError(f"descriptors must be [N, D], got shape {x.shape}")
    n = x.shape[0]
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if n < 2:
        return empty
    if int(k) < 1:
        raise ConfigError(f"k must be positive, got {k}")
    index = _dedup_index(x, factory, nprobe, progress)
    exact_scores = index.factory != "Flat"  # approximate scores (PQ, PCA) are recomputed from the vectors
    found_a: list[np.ndarray] = []
    found_b: list[np.ndarray] = []
    found_s: list[np.ndarray] = []
    todo = np.arange(n)
    kk = min(n, int(k) + 1)  # +1: each row finds itself
    bar = tqdm(total=n, desc="dedup neighbours", unit="img", disable=not progress)
    while len(todo):
        again: list[np.ndarray] = []
        for s in range(0, len(todo), batch_size):
            rows = todo[s:s + batch_size]
            scores, nn = index.search(x[rows], kk, rescore=exact_scores, rescore_k=kk)
            keep = (scores >= threshold) & (nn >= 0) & (nn != rows[:, None])
            qa = np.broadcast_to(rows[:, None], nn.shape)[keep]
            found_a.append(qa)
            found_b.append(nn[keep])
            found_s.append(scores[keep])
            full = (scores[:, -1] >= threshold) & (nn[:, -1] >= 0)
            again.append(rows[full] if kk < n else rows[:0])
            bar.update(int((~full).sum()) if kk < n else len(rows))
        todo = np.concatenate(again) if again else todo[:0]
        kk = min(n, kk * 4)
    bar.close()
    a, b, sc = np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_s)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    if not len(lo):
        return empty
    # one entry per unordered pair, its best score (an approximate index may find one direction only)
    order = np.lexsort((-sc, hi, lo))
    lo, hi, sc = lo[order], hi[order], sc[order]
    first = np.ones(len(lo), bool)
    first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    return lo[first].astype(np.int64), hi[first].astype(np.int64), sc[first].astype(np.float32)


def connected_groups(n: int, a: np.ndarray, b: np.ndarray) -> list[np.ndarray]:
    """Connected components of the graph with edges (a[i], b[i]) over n nodes, of size >= 2.

    Label propagation with pointer jumping (vectorised union-find): each node takes the smallest
    label among its neighbours until nothing changes. Groups are sorted by their smallest row."""
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    if len(a) == 0:
        return []
    label = np.arange(n, dtype=np.int64)
    while True:
        before = label.copy()
        la, lb = label[a], label[b]
        low = np.minimum(la, lb)
        np.minimum.at(label, la, low)  # merge the roots
        np.minimum.at(label, lb, low)
        while True:  # pointer jumping: every node points at its root
            nxt = label[label]
            if np.array_equal(nxt, label):
                break
            label = nxt
        if np.array_equal(label, before):
            break
    nodes = np.unique(np.concatenate([a, b]))
    labs = label[nodes]
    order = np.argsort(labs, kind="stable")
    nodes, labs = nodes[order], labs[order]
    cuts = np.flatnonzero(np.diff(labs)) + 1
    return [g for g in np.split(nodes, cuts) if len(g) >= 2]


# --------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------
@dataclass
class DuplicateGroup:
    """Images that are near-duplicates of each other; ``keep`` is the best-quality member's id."""

    members: list[dict]          # {"id", "path", "width", "height", "bytes"}, the kept one first
    keep: str
    pairs: list[dict]            # {"a": id, "b": id, "score": float, "inliers": int | None}

    @property
    def ids(self) -> list[str]:
        return [m["id"] for m in self.members]

    def to_remove(self) -> list[dict]:
        return [m for m in self.members if m["id"] != self.keep]


@dataclass
class DedupResult:
    """Groups of near-duplicates of a collection, and how they were found."""

    groups: list[DuplicateGroup]
    n_images: int
    threshold: float
    params: dict = field(default_factory=dict)

    def to_remove(self) -> list[str]:
        """Paths of every member but the best-quality one of each group."""
        return [m["path"] for g in self.groups for m in g.to_remove()]

    def group_of(self) -> dict[str, int]:
        """id -> group number, for the images in some group."""
        return {i: gi for gi, g in enumerate(self.groups) for i in g.ids}

    def to_dict(self) -> dict:
        return {"format": "irkit-dedup", "version": 1, "threshold": self.threshold, "n_images": self.n_images,
                "n_groups": len(self.groups), "n_duplicates": sum(len(g.members) - 1 for g in self.groups),
                "params": self.params,
                "groups": [{"keep": g.keep, "members": g.members, "pairs": g.pairs} for g in self.groups],
                "to_remove": self.to_remove()}


def image_info(path: str | os.PathLike) -> dict:
    """Width, height (from the header, no decoding) and file size; zeros when unreadable."""
    try:
        with Image.open(path) as im:
            w, h = im.size
        size = os.path.getsize(path)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        log.warning("dedup: cannot read the size of %s (%s)", path, exc)
        return {"width": 0, "height": 0, "bytes": 0}
    return {"width": int(w), "height": int(h), "bytes": int(size)}


def _quality_key(m: dict) -> tuple:
    # best first: most pixels, then largest file (least compressed), then the smallest id
    return (-m["width"] * m["height"], -m["bytes"], m["id"])


def _verify_pairs(paths: Sequence[str], a: np.ndarray, b: np.ndarray,
                  progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """SIFT + similarity-transform (inliers, mutual matches) of pairs of image files (-1 where unreadable)."""
    from irkit.search.spatial import SpatialVerifier

    rows = np.unique(np.concatenate([a, b])) if len(a) else a
    verifier = SpatialVerifier(max_side=640, model="similarity", cache_size=len(rows) + 1)
    out = np.zeros(len(a), dtype=np.int64)
    matches = np.zeros(len(a), dtype=np.int64)
    for i in tqdm(range(len(a)), desc="dedup verify", unit="pair", disable=not progress or len(a) == 0):
        try:
            fa = verifier.features(paths[a[i]])
            fb = verifier.features(paths[b[i]])
        except ImageError as exc:
            log.warning("dedup: cannot verify %s / %s (%s)", paths[a[i]], paths[b[i]], exc)
            out[i] = matches[i] = -1
            continue
        res = verifier.verify(fa, fb)
        out[i], matches[i] = res.inliers, res.n_matches
    return out, matches


def group_duplicates(descriptors: np.ndarray, ids: Sequence[str], paths: Sequence[str], *,
                     threshold: float = DEFAULT_THRESHOLD, verify: bool = False, margin: float = DEFAULT_MARGIN,
                     min_inliers: int = DEFAULT_MIN_INLIERS, min_inlier_ratio: float = DEFAULT_MIN_INLIER_RATIO,
                     k: int = DEFAULT_K, factory: str | None = None,
                     nprobe: int | None = None, sizes: Sequence[dict] | None = None,
                     progress: bool = True) -> DedupResult:
    """Near-duplicate groups of images given their descriptors [N, D] (rows match ``ids``/``paths``).

    Without ``verify`` a pair is a duplicate when its cosine similarity is >= ``threshold``. With
    ``verify``, pairs in ``[threshold - margin, threshold + margin)`` are decided by spatial
    verification (>= ``min_inliers`` similarity-transform inliers that are >= ``min_inlier_ratio``
    of the mutual matches), pairs above the band are kept.
    ``sizes``: per-image {"width","height","bytes"} (read from the files when None).
    """
    threshold = check_threshold(threshold)
    n = len(ids)
    if len(paths) != n or np.asarray(descriptors).shape[0] != n:
        raise ConfigError(f"descriptors ({np.asarray(descriptors).shape[0]}), ids ({n}) and paths "
                          f"({len(paths)}) must have one row per image")
    if verify:
        if not 0 <= float(margin) < threshold:
            raise ConfigError(f"margin must be in [0, threshold), got {margin}")
        if int(min_inliers) < 2:
            raise ConfigError(f"min_inliers must be at least 2 (a similarity needs 2 matches), got {min_inliers}")
        if not 0 <= float(min_inlier_ratio) <= 1:
            raise ConfigError(f"min_inlier_ratio must be in [0, 1], got {min_inlier_ratio}")
    low = threshold - float(margin) if verify else threshold
    a, b, s = find_pairs(descriptors, low, k=k, factory=factory, nprobe=nprobe, progress=progress)
    inliers = np.full(len(a), -1, dtype=np.int64)
    n_match = np.full(len(a), -1, dtype=np.int64)
    if verify and len(a):
        band = s < threshold + float(margin)
        inliers[band], n_match[band] = _verify_pairs(paths, a[band], b[band], progress)
        ratio = inliers / np.maximum(n_match, 1)
        accept = ~band | ((inliers >= int(min_inliers)) & (ratio >= float(min_inlier_ratio)))
        log.info("dedup: verified %d borderline pairs, kept %d", int(band.sum()), int((band & accept).sum()))
        a, b, s, inliers, n_match = a[accept], b[accept], s[accept], inliers[accept], n_match[accept]
    groups_rows = connected_groups(n, a, b)
    info: dict[int, dict] = {}
    for g in groups_rows:
        for r in g:
            r = int(r)
            info[r] = dict(sizes[r]) if sizes is not None else image_info(paths[r])
    label = {int(r): gi for gi, g in enumerate(groups_rows) for r in g}
    pairs_of: list[list[dict]] = [[] for _ in groups_rows]
    for i in range(len(a)):
        pairs_of[label[int(a[i])]].append({"a": ids[a[i]], "b": ids[b[i]], "score": round(float(s[i]), 5),
                                           "inliers": int(inliers[i]) if inliers[i] >= 0 else None,
                                           "matches": int(n_match[i]) if n_match[i] >= 0 else None})
    groups = []
    for gi, g in enumerate(groups_rows):
        members = sorted(({"id": ids[r], "path": str(paths[r]), **info[int(r)]} for r in g), key=_quality_key)
        pairs = sorted(pairs_of[gi], key=lambda p: -p["score"])
        groups.append(DuplicateGroup(members=members, keep=members[0]["id"], pairs=pairs))
    groups.sort(key=lambda g: (-len(g.members), g.keep))
    params = {"k": int(k), "factory": factory or auto_factory(n, int(np.asarray(descriptors).shape[1]))[0],
              "verify": bool(verify), "margin": float(margin) if verify else None,
              "min_inliers": int(min_inliers) if verify else None,
              "min_inlier_ratio": float(min_inlier_ratio) if verify else None}
    return DedupResult(groups=groups, n_images=n, threshold=threshold, params=params)


def find_duplicates(images: Any, *, threshold: float = DEFAULT_THRESHOLD, store: str | os.PathLike | None = None,
                    model: Any = DEFAULT_MODEL, weights: str | os.PathLike | None = None,
                    scales: Sequence[float] | None = DEFAULT_SCALES, device: str | None = "cpu",
                    verify: bool = False, margin: float = DEFAULT_MARGIN, min_inliers: int = DEFAULT_MIN_INLIERS,
                    min_inlier_ratio: float = DEFAULT_MIN_INLIER_RATIO, k: int = DEFAULT_K, progress: bool = True,
                    **extract_options: Any) -> DedupResult:
    """Near-duplicate groups of a folder, a .txt/.csv list or a list of image files.

    Descriptors are extracted with :func:`irkit.extract` into ``store`` (resumable: a re-run only
    extracts new images; default a temporary store that is deleted afterwards); ``images`` may also
    be an open :class:`~irkit.store.FeatureStore` (its descriptors and paths are used as they are).
    See :func:`group_duplicates` for ``threshold``, ``verify``, ``margin``, ``min_inliers`` and
    ``min_inlier_ratio``.
    """
    from irkit.data.collection import load_collection
    from irkit.extract import Item, extract_to_store
    from irkit.store import FeatureStore

    threshold = check_threshold(threshold)
    if isinstance(images, FeatureStore):
        return group_duplicates(images.descriptors(), images.ids, images.paths, threshold=threshold,
                                verify=verify, margin=margin, min_inliers=min_inliers,
                                min_inlier_ratio=min_inlier_ratio, k=k, progress=progress)
    if isinstance(images, (str, os.PathLike)):
        col = load_collection(images)
        items = [Item(i, str(p)) for i, p in zip(col.ids, col.paths)]
    else:
        items = [Item(Path(p).stem, str(p)) for p in images]
    if not items:
        raise ConfigError("no images to compare")
    if isinstance(model, str):
        from irkit.models.registry import build_model

        model = build_model(model, weights=weights, device=device)
    tmp = tempfile.TemporaryDirectory(prefix="irkit-dedup-") if store is None else None
    try:
        st = extract_to_store(model, items, tmp.name if tmp else store, scales=scales, progress=progress,
                              **extract_options)
        rows, ids, paths = [], [], []
        for it in items:  # the collection as it is now (a reused store may hold removed files)
            if it.id in st:
                rows.append(st.index_of(it.id))
                ids.append(it.id)
                paths.append(it.path)
        if not rows:
            raise StoreError("no image of the collection could be read; see the store's failure log")
        desc = st.take(np.asarray(rows))
        result = group_duplicates(desc, ids, paths, threshold=threshold, verify=verify, margin=margin,
                                  min_inliers=min_inliers, min_inlier_ratio=min_inlier_ratio, k=k,
                                  progress=progress)
        result.params.update({"model": getattr(model, "preset_name", type(model).__name__),
                              "scales": list(scales) if scales else None, "failed": len(items) - len(rows)})
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------
def write_json(result: DedupResult, path: str | os.PathLike) -> Path:
    """The groups, pairs and to-remove list as JSON (atomic)."""
    atomic_write_json(path, result.to_dict())
    return Path(path)


def read_json(path: str | os.PathLike) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read dedup report {path}: {exc}") from None


_CSS = """body{font-family:sans-serif;margin:1.5em;color:#222}
.group{border:1px solid #ccc;border-radius:6px;margin:1em 0;padding:.5em}
.group h2{font-size:1em;margin:.2em 0}
figure{display:inline-block;margin:4px;text-align:center;vertical-align:top;width:140px}
figure img{max-width:128px;max-height:128px;border:3px solid #ccc}
figure.keep img{border-color:#1a9c3e} figure.remove img{border-color:#d0312d}
figcaption{font-size:11px;word-break:break-all}
.noimg{width:128px;height:96px;background:#eee;font-size:11px}
table.pairs{font-size:11px;border-collapse:collapse} table.pairs td{padding:1px 6px}"""


def _inliers(pair: dict) -> str:
    return "" if pair.get("inliers") is None else f"{pair['inliers']}/{pair['matches']}"


def write_html(result: DedupResult, path: str | os.PathLike, *, thumbnails: bool = True,
               max_groups: int = MAX_HTML_GROUPS) -> Path:
    """A static HTML page: one box per group with thumbnails (kept member framed green, the others
    red), sizes and pair scores. Thumbnails go to ``<stem>_files/`` beside the page."""
    out = Path(path)
    assets = out.with_name(out.stem + "_files")
    rel = assets.name
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>irkit dedup</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>Near-duplicates</h1><p id='summary'>{result.n_images} images, {len(result.groups)} groups, "
             f"{sum(len(g.members) - 1 for g in result.groups)} images to remove; threshold "
             f"{result.threshold:g}{', borderline pairs spatially verified' if result.params.get('verify') else ''}."
             "</p>"]
    if thumbnails and result.groups:
        assets.mkdir(parents=True, exist_ok=True)
    shown = result.groups[:max_groups]
    for gi, g in enumerate(tqdm(shown, desc="dedup report", unit="group", disable=len(shown) < 50)):
        figs = []
        for m in g.members:
            key = hashlib.sha1(f"{m['path']}|{m['bytes']}".encode()).hexdigest()[:16]
            url = write_thumbnail(Path(m["path"]), None, assets / f"{key}.jpg", rel, thumbnails)
            cls = "keep" if m["id"] == g.keep else "remove"
            figs.append(figure_html(url, f"{'keep' if cls == 'keep' else 'remove'}: {m['id']} "
                                     f"({m['width']}x{m['height']}, {m['bytes'] // 1024} KiB)", cls))
        rows = "".join(f"<tr><td>{html.escape(p['a'])}</td><td>{html.escape(p['b'])}</td><td>{p['score']:.4f}</td>"
                       f"<td>{_inliers(p)}</td></tr>" for p in g.pairs[:50])
        parts.append(f"<div class='group' id='group-{gi}'><h2>group {gi + 1}: {len(g.members)} images</h2>"
                     f"{''.join(figs)}<table class='pairs'><tr><th>a</th><th>b</th><th>cosine</th>"
                     f"<th>inliers</th></tr>{rows}</table></div>")
    if len(result.groups) > len(shown):
        parts.append(f"<p>{len(result.groups) - len(shown)} more groups are in the JSON report.</p>")
    parts.append("</body></html>")
    atomic_write_text(out, "\n".join(parts))
    return out


__all__ = ["find_duplicates", "group_duplicates", "find_pairs", "connected_groups", "DedupResult",
           "DuplicateGroup", "write_json", "write_html", "check_threshold", "DEFAULT_THRESHOLD"]

"""Cleaning a noisy labelled landmark set by spatial verification (Gordo et al., ECCV 2016).

Web-collected landmark classes contain images of something else (interiors, maps, people, other
buildings). Gordo et al. kept, per class, the images that geometrically verify against each
other: build a graph whose nodes are the class's images and whose edges are pairs with enough
RANSAC inliers, then keep the largest connected component. GLDv2's ``train_clean.csv`` was made
the same way.

Input: any labelled layout :func:`irkit.data.labelled.load_labelled` reads (a folder per class,
a GLDv2 CSV, ...); image ids must be unique and free of whitespace (they go into the CSV).

Pairs to verify: with global descriptors (``descriptors`` mapping id -> vector, or a
``descriptor_fn(paths) -> [n, D]`` such as a retrieval model), each image is verified against its
``shortlist`` most similar images of the class. Without them, classes of up to ``all_pairs_max``
images verify all pairs (n(n-1)/2); larger classes verify each image against ``shortlist``
random others (seeded) — weaker, so pass descriptors for big classes.

Outputs in ``out_dir``: ``train_clean.csv`` (``landmark_id,images``), ``report.html`` (kept and
dropped per class, thumbnails of dropped images in ``thumbs/``), ``summary.json``, and one JSON per
class in ``classes/`` holding the verified edges, components and the boxes of inlier keypoints
(where the landmark is: training boxes for region proposals). Per-class results make the run
resumable: a class whose result file exists with the same configuration is not redone.
"""
from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from irkit.data.labelled import LabelledImages, load_labelled
from irkit.errors import ConfigError, DatasetError, IrkitError
from irkit.io.images import load_image
from irkit.search.spatial import LocalFeatures, SpatialVerifier, inlier_box
from irkit.utils import atomic_write_bytes, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

DescriptorFn = Callable[[Sequence[Path]], np.ndarray]

@dataclass(frozen=True)
class CleanConfig:
    """min_inliers: an edge needs at least this many RANSAC inliers. shortlist: pairs per image
    (global-descriptor neighbours, or random ones in large classes without descriptors).
    keep: "largest" (the largest component, if it has >= 2 images) or "min-size:K" (every
    component of at least K images). all_pairs_max: classes up to this size verify all pairs when no
    descriptors are given. max_side / max_features: SIFT extraction. thumb_side: dropped thumbnails."""

    min_inliers: int = 15
    shortlist: int = 10
    keep: str = "largest"
    all_pairs_max: int = 40
    max_side: int = 640
    max_features: int = 1000
    reproj_threshold: float = 8.0
    seed: int = 0
    thumb_side: int = 128

    def __post_init__(self) -> None:
        parse_keep(self.keep)
        if self.min_inliers < 1 or self.shortlist < 1:
            raise ConfigError(f"min_inliers and shortlist must be >= 1, got {self.min_inliers}, {self.shortlist}")

    def digest(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class ClassResult:
    """Result of one class: kept / dropped / unreadable ids, edges (id_a, id_b, inliers),
    components (lists of ids, largest first) and inlier boxes per kept id [x1,y1,x2,y2]."""

    name: str
    kept: list[str]
    dropped: list[str]
    unreadable: list[str] = field(default_factory=list)
    edges: list[tuple[str, str, int]] = field(default_factory=list)
    components: list[list[str]] = field(default_factory=list)
    boxes: dict[str, list[float]] = field(default_factory=dict)
    n_pairs: int = 0


def parse_keep(keep: str) -> int | None:
    """"largest" -> None; "min-size:K" -> K (>= 1). ConfigError otherwise."""
    if keep == "largest":
        return None
    if keep.startswith("min-size:"):
        try:
            k = int(keep.split(":", 1)[1])
        except ValueError:
            k = 0
        if k >= 1:
            return k
    raise ConfigError(f"invalid --keep {keep!r}: use 'largest' or 'min-size:K' with K >= 1")


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def class_lists(data: LabelledImages) -> tuple[dict[str, list[str]], dict[str, Path]]:
    """Class name -> image ids, and id -> file. Ids name images in the output CSV and the per-class
    results, so they must be unique and free of whitespace (DatasetError naming the file otherwise)."""
    paths: dict[str, Path] = {}
    for ident, path in zip(data.ids, data.paths):
        if any(c.isspace() for c in ident):
            raise DatasetError(f"{path}: image names with spaces cannot be written to a train_clean CSV; rename it")
        if ident in paths:
            raise DatasetError(f"image id {ident!r} appears twice ({paths[ident]} and {path}); ids must be unique")
        paths[ident] = path
    classes = {name: [data.ids[r] for r in rows] for name, rows in data.by_class().items()}
    return classes, paths


# --------------------------------------------------------------------------------------------
# graph
# --------------------------------------------------------------------------------------------
def candidate_pairs(n: int, descriptors: np.ndarray | None, shortlist: int, all_pairs_max: int,
                    rng: np.random.Generator) -> list[tuple[int, int]]:
    """Pairs (i < j) to verify inside one class of ``n`` images (see the module docstring)."""
    if n < 2:
        return []
    k = min(shortlist, n - 1)
    pairs: set[tuple[int, int]] = set()
    if descriptors is not None:
        sims = descriptors @ descriptors.T
        np.fill_diagonal(sims, -np.inf)
        nn = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        for i in range(n):
            pairs.update((min(i, int(j)), max(i, int(j))) for j in nn[i])
    elif n <= all_pairs_max:
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    else:
        for i in range(n):
            others = rng.choice(n - 1, size=k, replace=False)
            pairs.update((min(i, int(j) + (j >= i)), max(i, int(j) + (j >= i))) for j in others)
    return sorted(pairs)


def connected_components(n: int, edges: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Components (sorted node lists) of an undirected graph, largest first (ties: smallest node first)."""
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]))


def select_components(components: list[list[int]], keep: str) -> list[int]:
    """Nodes kept by the ``keep`` rule (a lone image never verifies, so "largest" needs >= 2)."""
    k = parse_keep(keep)
    if k is None:
        return sorted(components[0]) if components and len(components[0]) >= 2 else []
    return sorted(i for c in components if len(c) >= k for i in c)


# --------------------------------------------------------------------------------------------
# cleaning
# --------------------------------------------------------------------------------------------
def _thumbnail(img: np.ndarray, side: int) -> bytes:
    h, w = img.shape[:2]
    s = min(1.0, side / max(h, w))
    small = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
    if not ok:  # pragma: no cover - cv2 encodes any uint8 image
        raise IrkitError("could not encode a thumbnail")
    return buf.tobytes()


def _class_key(name: str) -> str:
    return hashlib.sha1(name.encode("utf-8")).hexdigest()[:16]


def clean_class(name: str, ids: Sequence[str], paths: Mapping[str, Path], cfg: CleanConfig,
                verifier: SpatialVerifier, descriptors_for: Callable[[list[str]], np.ndarray] | None = None,
                thumbs_dir: Path | None = None) -> ClassResult:
    """Verify one class and keep its consistent images; see the module docstring.

    ``descriptors_for(ids) -> [len(ids), D]``: global descriptors of the readable images, for the
    shortlist (None: no shortlist model). Unreadable images are reported and dropped (before any
    descriptor is asked for). Thumbnails of dropped images go to ``thumbs_dir``.
    """
    feats: list[LocalFeatures] = []
    good: list[int] = []
    images: dict[int, np.ndarray] = {}
    unreadable: list[str] = []
    for i, ident in enumerate(ids):
        try:
            img = load_image(paths[ident])
        except IrkitError as exc:
            log.warning("class %s: skipping %s (%s)", name, ident, exc)
            unreadable.append(ident)
            continue
        f = verifier.features(img)
        # float16 descriptors halve the memory of large classes; matching computes in float32
        feats.append(LocalFeatures(f.keypoints, f.descriptors.astype(np.float16), f.image_size, f.scores))
        good.append(i)
        if thumbs_dir is not None:
            images[i] = cv2.resize(img, None, fx=min(1.0, cfg.thumb_side / max(img.shape[:2])),
                                   fy=min(1.0, cfg.thumb_side / max(img.shape[:2])), interpolation=cv2.INTER_AREA)
    gids = [ids[i] for i in good]
    desc = _normalised(descriptors_for(gids), len(gids)) if descriptors_for is not None and len(gids) > 1 else None
    rng = np.random.default_rng([cfg.seed, int(_class_key(name), 16) % (2 ** 32)])
    pairs = candidate_pairs(len(gids), desc, cfg.shortlist, cfg.all_pairs_max, rng)
    edges: list[tuple[int, int]] = []
    edge_out: list[tuple[str, str, int]] = []
    boxes: dict[int, list[float]] = {}
    for a, b in pairs:
        res = verifier.verify(feats[a], feats[b])
        if res.inliers < cfg.min_inliers:
            continue
        edges.append((a, b))
        edge_out.append((gids[a], gids[b], res.inliers))
        for node, side in ((a, "query"), (b, "db")):
            box = inlier_box(feats[node], res, side)
            if box is None:
                continue
            old = boxes.get(node)
            boxes[node] = list(box) if old is None else [min(old[0], box[0]), min(old[1], box[1]),
                                                        max(old[2], box[2]), max(old[3], box[3])]
    comps = connected_components(len(gids), edges)
    kept_idx = set(select_components(comps, cfg.keep))
    kept = [gids[i] for i in range(len(gids)) if i in kept_idx]
    dropped = [gids[i] for i in range(len(gids)) if i not in kept_idx]
    if thumbs_dir is not None:
        for i in range(len(gids)):
            if i not in kept_idx:
                atomic_write_bytes(thumbs_dir / f"{gids[i]}.jpg", _thumbnail(images[good[i]], cfg.thumb_side))
    return ClassResult(name=name, kept=kept, dropped=dropped, unreadable=unreadable, edges=edge_out,
                       components=[[gids[i] for i in c] for c in comps],
                       boxes={gids[i]: v for i, v in boxes.items() if i in kept_idx}, n_pairs=len(pairs))


def _normalised(d: np.ndarray, n: int) -> np.ndarray:
    d = np.asarray(d, dtype=np.float32)
    if d.ndim != 2 or d.shape[0] != n:
        raise ConfigError(f"global descriptors have shape {d.shape}; expected [{n}, D]")
    return d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)


def _descriptor_source(paths: Mapping[str, Path], descriptors: Mapping[str, np.ndarray] | None,
                       descriptor_fn: DescriptorFn | None) -> Callable[[list[str]], np.ndarray] | None:
    """One interface (ids -> [n, D]) over precomputed descriptors and a model's ``descriptor_fn``."""
    if descriptors is not None:
        def lookup(ids: list[str]) -> np.ndarray:
            missing = [i for i in ids if i not in descriptors]
            if missing:
                raise DatasetError(f"no global descriptor for {len(missing)} image(s), e.g. {missing[:3]}")
            return np.stack([np.asarray(descriptors[i], np.float32) for i in ids])
        return lookup
    if descriptor_fn is not None:
        return lambda ids: descriptor_fn([paths[i] for i in ids])
    return None


def clean_dataset(data: LabelledImages, out_dir: str | os.PathLike, cfg: CleanConfig = CleanConfig(),
                  descriptor_fn: DescriptorFn | None = None,
                  descriptors: Mapping[str, np.ndarray] | None = None,
                  verifier: SpatialVerifier | None = None, progress: bool = True) -> dict:
    """Clean every class of ``data`` and write the outputs to ``out_dir``; returns the summary dict.

    ``descriptor_fn`` is the hook for a global model (paths -> [n, D]); ``descriptors`` are
    precomputed ones by image id. Either enables the shortlist; neither means spatial verification
    of all pairs in small classes (see the module docstring).
    """
    out = Path(out_dir)
    verifier = verifier or SpatialVerifier(max_features=cfg.max_features, max_side=cfg.max_side,
                                           reproj_threshold=cfg.reproj_threshold, cache_size=0)
    digest = cfg.digest() + ("-desc" if (descriptors is not None or descriptor_fn is not None) else "")
    classes, paths = class_lists(data)
    source = _descriptor_source(paths, descriptors, descriptor_fn)
    results: list[ClassResult] = []
    for name, ids in tqdm(classes.items(), desc="clean", unit="class", disable=not progress):
        key = _class_key(name)
        res_path = out / "classes" / f"{key}.json"
        if res_path.is_file():
            try:
                saved = json.loads(res_path.read_text(encoding="utf-8"))
                if saved.get("config") == digest and saved["result"]["name"] == name:
                    r = saved["result"]
                    r["edges"] = [tuple(e) for e in r["edges"]]
                    results.append(ClassResult(**r))
                    continue
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring unreadable previous result %s", res_path)
        res = clean_class(name, ids, paths, cfg, verifier, source, thumbs_dir=out / "thumbs" / key)
        atomic_write_json(res_path, {"config": digest, "result": asdict(res)})
        results.append(res)
    return write_outputs(results, out, cfg)


def write_outputs(results: Sequence[ClassResult], out: Path, cfg: CleanConfig) -> dict:
    """train_clean.csv, summary.json and report.html from per-class results."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["landmark_id", "images"])
    for r in results:
        if r.kept:
            w.writerow([r.name, " ".join(r.kept)])
    atomic_write_text(out / "train_clean.csv", buf.getvalue())
    summary = {
        "config": asdict(cfg),
        "classes": len(results),
        "classes_kept": sum(1 for r in results if r.kept),
        "images": sum(len(r.kept) + len(r.dropped) + len(r.unreadable) for r in results),
        "kept": sum(len(r.kept) for r in results),
        "dropped": sum(len(r.dropped) for r in results),
        "unreadable": sum(len(r.unreadable) for r in results),
        "per_class": {r.name: {"kept": len(r.kept), "dropped": len(r.dropped), "unreadable": len(r.unreadable),
                               "pairs_verified": r.n_pairs, "edges": len(r.edges)} for r in results},
    }
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "report.html", _report_html(results, summary))
    log.info("cleaned %d classes: kept %d of %d images (%d dropped, %d unreadable)", summary["classes"],
             summary["kept"], summary["images"], summary["dropped"], summary["unreadable"])
    return summary


def _report_html(results: Sequence[ClassResult], summary: dict) -> str:
    e = html.escape
    rows = []
    for r in results:
        key = _class_key(r.name)
        thumbs = "".join(
            f'<figure><img src="thumbs/{e(key)}/{e(i)}.jpg" alt="{e(i)}" loading="lazy"><figcaption>{e(i)}</figcaption></figure>'
            for i in r.dropped)
        unread = ", ".join(e(i) for i in r.unreadable)
        rows.append(f"<tr><td>{e(r.name)}</td><td>{len(r.kept)}</td><td>{len(r.dropped)}</td>"
                    f"<td>{len(r.unreadable)}</td><td>{r.n_pairs}</td><td>{len(r.edges)}</td>"
                    f"<td class=t>{thumbs}{('<p>unreadable: ' + unread + '</p>') if unread else ''}</td></tr>")
    cfg = summary["config"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>irkit clean report</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}}th{{background:#eee}}
figure{{display:inline-block;margin:2px;text-align:center;font-size:11px}}img{{max-width:128px;max-height:128px}}</style>
</head><body>
<h1>Cleaning report</h1>
<p>{summary['classes']} classes ({summary['classes_kept']} with images kept); {summary['images']} images:
<b>{summary['kept']} kept</b>, {summary['dropped']} dropped, {summary['unreadable']} unreadable.
Edge rule: at least {cfg['min_inliers']} RANSAC inliers; keep: {e(cfg['keep'])}; shortlist {cfg['shortlist']}.</p>
<table><thead><tr><th>class</th><th>kept</th><th>dropped</th><th>unreadable</th><th>pairs verified</th>
<th>edges</th><th>dropped images</th></tr></thead><tbody>
{''.join(rows)}
</tbody></table></body></html>
"""

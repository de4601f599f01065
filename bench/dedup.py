"""Benchmark: near-duplicate finding (irkit.find_duplicates) on real photos with planted duplicates.

    python bench/dedup.py                          # effnetlite2-gem, threshold 0.9, + the 100k timing
    python bench/dedup.py --per-kind 20 --workdir /tmp/dedup_bench   # keep the store for re-runs

Set: every photo of ../shared/assets (minidev's 114 and the 385 of train/real-multiview), plus, for
``--per-kind`` distinct originals per kind, one planted copy of each kind: an exact copy, resized to
50 %, re-encoded as JPEG quality 15, a centred crop of 80 % of each side, brightness/contrast
changed, a caption drawn on it, rotated by 5 degrees. A planted copy is found when it ends in its
original's group. Per kind: recall = copies found / copies planted; precision = of the pairs in the
groups that contain a copy of that kind, those that are (copy, its original); exact groups = copies
whose group is exactly {copy, original} (no other photo chained in). Pairs between two
originals are not planted; they are listed (the sources hold genuine near-duplicates: a few
UKBench views and WxBS pairs are nearly the same photo).

Then the time of find_pairs + connected_groups on 100k synthetic 1280-D descriptors with 3,000
planted near-duplicates (cosine ~0.98) of 1,000 originals, and their pair recall. The machine's
load (os.getloadavg) is printed with every figure: 2 cores shared with other jobs make timings vary.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from irkit.search.dedup import (connected_groups, find_duplicates, find_pairs,  # noqa: E402
                                group_duplicates)
from irkit.store import FeatureStore  # noqa: E402
from _machine import machine_report  # noqa: E402  (bench/ is the script's folder)

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
KINDS = ("exact", "resized", "jpeg_q15", "crop80", "bright_contrast", "text", "rotate5")


def load_text() -> str:
    return machine_report(sample_s=0.5)


def plant(kind: str, src: Path, dst: Path) -> None:
    """Write a planted duplicate of ``src`` of the given kind."""
    if kind == "exact":
        shutil.copyfile(src, dst)
        return
    im = Image.open(src).convert("RGB")
    w, h = im.size
    quality = 90
    if kind == "resized":
        im = im.resize((max(1, w // 2), max(1, h // 2)), Image.LANCZOS)
    elif kind == "jpeg_q15":
        quality = 15
    elif kind == "crop80":
        im = im.crop((int(0.1 * w), int(0.1 * h), int(0.9 * w), int(0.9 * h)))
    elif kind == "bright_contrast":
        im = ImageEnhance.Contrast(ImageEnhance.Brightness(im).enhance(1.3)).enhance(0.8)
    elif kind == "text":
        draw = ImageDraw.Draw(im)
        draw.rectangle((8, h - 40, min(w - 8, 260), h - 8), fill=(255, 255, 255))
        draw.text((14, h - 34), "(c) irkit 2024 - holiday", fill=(0, 0, 0))
    elif kind == "rotate5":
        im = im.rotate(5, resample=Image.BICUBIC, expand=False)
    else:
        raise ValueError(kind)
    im.save(dst, format="JPEG", quality=quality)


def build_set(root: Path, per_kind: int, seed: int) -> tuple[dict[str, str], dict[str, str]]:
    """Originals (symlinked) and planted copies under ``root``; returns copy id -> original id and
    copy id -> kind."""
    photos = sorted((ASSETS / "datasets" / "minidev" / "jpg").glob("*.jpg"))
    photos += sorted((ASSETS / "train" / "real-multiview").glob("*/*.jpg"))
    if not photos:
        raise SystemExit(f"no photos under {ASSETS} (../shared/assets is needed for this benchmark)")
    (root / "orig").mkdir(parents=True, exist_ok=True)
    (root / "dup").mkdir(parents=True, exist_ok=True)
    ids = []
    for p in photos:
        link = root / "orig" / p.name
        if not link.exists():
            link.symlink_to(p)
        ids.append(f"orig/{p.stem}")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(photos), size=per_kind * len(KINDS), replace=False)
    copy_of, kind_of = {}, {}
    for i, kind in enumerate(KINDS):
        for j in chosen[i * per_kind:(i + 1) * per_kind]:
            src = photos[j]
            cid = f"dup/{kind}__{src.stem}"
            dst = root / f"{cid}.jpg"
            if not dst.exists():
                plant(kind, src, dst)
            copy_of[cid], kind_of[cid] = f"orig/{src.stem}", kind
    return copy_of, kind_of


def score(result, copy_of: dict[str, str], kind_of: dict[str, str]) -> tuple[dict, list]:
    """Per kind: (recall, precision, exact groups, n planted); and the unplanted pairs (both originals)."""
    group = result.group_of()
    pred_pairs = [tuple(sorted(p)) for g in result.groups for p in combinations(g.ids, 2)]
    out = {}
    for kind in KINDS:
        copies = [c for c, k in kind_of.items() if k == kind]
        found = sum(1 for c in copies if c in group and group.get(copy_of[c]) == group[c])
        involved = [p for p in pred_pairs if any(kind_of.get(x) == kind for x in p)]
        true = sum(1 for a, b in involved if copy_of.get(a) == b or copy_of.get(b) == a)
        pure = sum(1 for c in copies if c in group and sorted(result.groups[group[c]].ids) == sorted([c, copy_of[c]]))
        out[kind] = (found / len(copies), true / len(involved) if involved else float("nan"), pure / len(copies),
                     len(copies))
    other = [p for p in pred_pairs if not any(x in kind_of for x in p)]
    return out, other


def print_scores(title: str, result, copy_of, kind_of, seconds: float) -> None:
    per_kind, other = score(result, copy_of, kind_of)
    n_pred = sum(len(g.members) * (len(g.members) - 1) // 2 for g in result.groups)
    print(f"\n{title}: {len(result.groups)} groups, {n_pred} pairs in groups, {seconds:.1f} s  [{load_text()}]")
    print(f"{'kind':<16}{'recall':>8}{'precision':>11}{'exact groups':>14}{'planted':>9}")
    for kind, (rec, prec, pure, n) in per_kind.items():
        print(f"{kind:<16}{rec:>8.3f}{prec:>11.3f}{pure:>14.3f}{n:>9d}")
    rec_all = np.mean([v[0] for v in per_kind.values()])
    true_all = sum(1 for g in result.groups for a, b in combinations(g.ids, 2)
                   if copy_of.get(a) == b or copy_of.get(b) == a)
    pure_all = np.mean([v[2] for v in per_kind.values()])
    print(f"{'all':<16}{rec_all:>8.3f}{true_all / max(1, n_pred):>11.3f}{pure_all:>14.3f}{len(kind_of):>9d}")
    print(f"unplanted pairs between two original photos: {len(other)}"
          + (f", e.g. {other[:4]}" if other else ""))


def bench_100k(n: int, dim: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.choice(n, 1000, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), src), 3000, replace=False)
    for i, t in enumerate(dst):
        v = x[src[i % 1000]] + (0.006 * 1280 ** 0.5 / dim ** 0.5) * rng.standard_normal(dim, dtype=np.float32)
        x[t] = v / np.linalg.norm(v)
    print(f"\ngrouping {n} synthetic {dim}-D descriptors (1000 originals with 3 near-duplicates each, "
          f"cosine ~{float(x[dst[0]] @ x[src[0]]):.3f})  [{load_text()}]")
    t0 = time.perf_counter()
    a, b, _ = find_pairs(x, 0.9, progress=False)
    t1 = time.perf_counter()
    groups = connected_groups(n, a, b)
    t2 = time.perf_counter()
    truth = {int(t): int(src[i % 1000]) for i, t in enumerate(dst)}
    label = {int(r): gi for gi, g in enumerate(groups) for r in g}
    found = sum(1 for t, s in truth.items() if t in label and label.get(s) == label[t])
    print(f"find_pairs {t1 - t0:.1f} s, connected_groups {t2 - t1:.3f} s, total {t2 - t0:.1f} s; "
          f"{len(groups)} groups; planted copies found {found}/{len(truth)}  [{load_text()}]")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="effnetlite2-gem")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--per-kind", type=int, default=15, help="planted copies per kind")
    p.add_argument("--workdir", default=None, help="keep the set and the store here (default: a temp dir)")
    p.add_argument("--no-verify", action="store_true", help="skip the run with spatial verification")
    p.add_argument("--n", type=int, default=100_000, help="synthetic descriptors for the timing (0 = skip)")
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tmp = tempfile.TemporaryDirectory(prefix="irkit-dedup-bench-") if args.workdir is None else None
    root = Path(tmp.name if tmp else args.workdir)
    try:
        copy_of, kind_of = build_set(root / "images", args.per_kind, args.seed)
        print(f"set: {len(list((root / 'images' / 'orig').iterdir()))} real photos + {len(kind_of)} planted "
              f"copies ({args.per_kind} per kind); model {args.model}, one scale, threshold {args.threshold}")
        t0 = time.perf_counter()
        result = find_duplicates(root / "images", threshold=args.threshold, store=root / "store",
                                 model=args.model, progress=False)
        print_scores("descriptors only (extraction included)", result, copy_of, kind_of, time.perf_counter() - t0)
        store = FeatureStore.open(root / "store")
        ids = [i for i in store.ids]
        for t in (0.85, 0.95):
            r = group_duplicates(store.descriptors(), ids, store.paths, threshold=t, progress=False)
            print_scores(f"threshold {t}", r, copy_of, kind_of, 0.0)
        if not args.no_verify:
            t0 = time.perf_counter()
            r = group_duplicates(store.descriptors(), ids, store.paths, threshold=args.threshold, verify=True,
                                 progress=False)
            print_scores(f"threshold {args.threshold} with spatial verification of "
                         f"[{args.threshold - r.params['margin']:.2f}, {args.threshold + r.params['margin']:.2f})",
                         r, copy_of, kind_of, time.perf_counter() - t0)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if args.n:
        bench_100k(args.n, args.dim, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())

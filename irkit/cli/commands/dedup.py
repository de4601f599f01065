"""`irkit dedup FOLDER`: groups of near-duplicate images, a JSON of the groups and an HTML report."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from irkit.cli.common import add_model_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dedup", help="find near-duplicate images (copies, resized, re-encoded, cropped, edited)",
                       description="Extract global descriptors of a folder (resumable store), find the pairs "
                       "above a cosine threshold through a faiss index, group them, and write a JSON of the "
                       "groups and an HTML report with thumbnails. Each group keeps its largest image.")
    p.add_argument("source", metavar="FOLDER", help="folder of images or .txt/.csv list")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="cosine similarity above which two images are duplicates (default 0.9)")
    p.add_argument("-o", "--output", default="dedup_report.html", metavar="HTML",
                   help="HTML report (default dedup_report.html; thumbnails in <stem>_files/)")
    p.add_argument("--json", default=None, metavar="PATH", help="JSON of the groups (default: <report stem>.json)")
    p.add_argument("--store", default=None, metavar="DIR",
                   help="feature store of the descriptors, reused by later runs (default: <report stem>_store/)")
    p.add_argument("--to-remove", action="store_true",
                   help="print the paths to remove (all but the largest image of each group), one a line")
    p.add_argument("--verify", action="store_true",
                   help="decide the pairs within --margin of the threshold by SIFT spatial verification "
                        "(a similarity transform explaining most matches: a copy, not another view)")
    p.add_argument("--margin", type=float, default=0.05, help="borderline band around the threshold (--verify)")
    p.add_argument("--min-inliers", type=int, default=8,
                   help="similarity-transform inliers that confirm a pair (--verify, default 8)")
    p.add_argument("--min-inlier-ratio", type=float, default=0.9,
                   help="share of the mutual SIFT matches that must be inliers (--verify, default 0.9)")
    p.add_argument("--k", type=int, default=16, help="neighbours asked per image (grown automatically for big groups)")
    p.add_argument("--no-thumbnails", action="store_true", help="HTML without thumbnails (faster)")
    p.add_argument("--batch-size", type=int, default=8)
    add_model_args(p)
    p.set_defaults(func=run, scales=None)


def run(args: argparse.Namespace) -> int:
    from irkit.search.dedup import DEFAULT_SCALES, check_threshold, find_duplicates, write_html, write_json

    check_threshold(args.threshold)
    out = Path(args.output)
    json_path = Path(args.json) if args.json else out.with_suffix(".json")
    store = args.store or str(out.with_name(out.stem + "_store"))
    result = find_duplicates(args.source, threshold=args.threshold, store=store, model=args.model,
                             weights=args.weights, scales=args.scales or DEFAULT_SCALES, device=args.device,
                             verify=args.verify, margin=args.margin, min_inliers=args.min_inliers,
                             min_inlier_ratio=args.min_inlier_ratio, k=args.k,
                             batch_size=args.batch_size)
    write_json(result, json_path)
    write_html(result, out, thumbnails=not args.no_thumbnails)
    n_dup = sum(len(g.members) - 1 for g in result.groups)
    print(f"{result.n_images} images: {len(result.groups)} groups of near-duplicates, {n_dup} to remove; "
          f"report {out}, groups {json_path}", file=sys.stderr if args.to_remove else sys.stdout)
    if args.to_remove:
        for path in result.to_remove():
            print(path)
    return 0

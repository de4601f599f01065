"""`irkit clean`: clean a noisy labelled landmark set by spatial verification (Gordo et al.).

Input: a folder per class (``root/<class>/*.jpg``) or a GLDv2 CSV (``id,landmark_id`` or
``landmark_id,images``) with images at ``--image-root/a/b/c/<id>.jpg``. Output: ``train_clean.csv``,
``report.html`` (+ thumbnails of dropped images), ``summary.json`` and per-class results (resumable).
Without ``--model`` only spatial verification is used: all pairs in classes of up to
``--all-pairs-max`` images, a random shortlist in larger ones. With ``--model PRESET`` the
shortlist is each image's nearest neighbours in the class by the model's global descriptors.
"""
from __future__ import annotations

import argparse
import logging

from irkit.cli.common import add_model_args
from irkit.errors import ConfigError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("clean", help="clean a noisy landmark set by spatial verification",
                       description="Keep, per class, the images that geometrically verify against each other "
                       "(largest connected component of the inlier graph); write a GLDv2-style "
                       "train_clean.csv and an HTML report.")
    p.add_argument("input", help="folder root/<class>/*.jpg, or a GLDv2 CSV (id,landmark_id or landmark_id,images)")
    p.add_argument("-o", "--out", required=True, help="output directory (created; re-running resumes)")
    p.add_argument("--image-root", help="with a CSV: root of the a/b/c/<id>.jpg images (default: the CSV's folder)")
    p.add_argument("--min-inliers", type=int, default=15, help="RANSAC inliers for an edge (default 15)")
    p.add_argument("--shortlist", type=int, default=10, help="pairs verified per image (default 10)")
    p.add_argument("--keep", default="largest", help="'largest' component or 'min-size:K' (every component of >= K)")
    p.add_argument("--all-pairs-max", type=int, default=40,
                   help="without --model, classes up to this size verify all pairs (default 40)")
    p.add_argument("--max-side", type=int, default=640, help="SIFT on images shrunk to this side (default 640)")
    p.add_argument("--max-features", type=int, default=1000, help="SIFT features per image (default 1000)")
    p.add_argument("--reproj-threshold", type=float, default=8.0, help="RANSAC threshold in pixels (default 8)")
    add_model_args(p, default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from irkit.data.labelled import load_labelled
    from irkit.search.clean import CleanConfig, clean_dataset

    cfg = CleanConfig(min_inliers=args.min_inliers, shortlist=args.shortlist, keep=args.keep,
                      all_pairs_max=args.all_pairs_max, max_side=args.max_side, max_features=args.max_features,
                      reproj_threshold=args.reproj_threshold)
    if args.max_side < 32 or args.max_features < 1:
        raise ConfigError("--max-side must be >= 32 and --max-features >= 1")
    data = load_labelled(args.input, args.image_root)
    descriptor_fn = None
    if args.model:
        # the hook: any callable paths -> [n, D] works; here a preset's global descriptors
        from irkit.cli.common import model_from_args
        from irkit.extract import embed_files

        model = model_from_args(args)
        descriptor_fn = lambda paths: embed_files(model, paths, args.scales)  # noqa: E731
    summary = clean_dataset(data, args.out, cfg, descriptor_fn=descriptor_fn)
    print(f"{args.out}: kept {summary['kept']} of {summary['images']} images in {summary['classes_kept']} of "
          f"{summary['classes']} classes ({summary['dropped']} dropped, {summary['unreadable']} unreadable); "
          f"see {args.out}/report.html")
    return 0

"""`irkit explain QUERY IMAGE -o out.png`: draw why two images match (strongest correlation matches)."""
from __future__ import annotations

import argparse
from pathlib import Path

from irkit.cli.common import add_model_args
from irkit.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="draw the strongest correlation matches of an image pair",
                       description="Draw QUERY and IMAGE side by side with the re-ranker's strongest mutual "
                       "nearest-neighbour correlation matches as lines and a heat map of each position's "
                       "best correlation; the pair's scores are printed and written in the picture.")
    p.add_argument("query", metavar="QUERY", help="query image")
    p.add_argument("image", metavar="IMAGE", help="database image")
    p.add_argument("-o", "--out", required=True, help="output picture (.png or .jpg)")
    p.add_argument("--top", type=int, default=40, help="matches drawn (default 40)")
    p.add_argument("--height", type=int, default=480, help="height of the drawn images in pixels (default 480)")
    p.add_argument("--no-heat", action="store_true", help="lines only, no heat-map tint")
    p.add_argument("--lambda", dest="lam", type=float, default=0.5, help="weight of the re-rank score (default 0.5)")
    add_model_args(p, default="cvnet-r50")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from irkit.cli.common import model_from_args
    from irkit.io.images import load_image
    from irkit.search.explain import explain_pair
    from irkit.utils import atomic_path

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise ConfigError(f"--out must end in .png or .jpg, got {out.name!r}")
    if args.top < 1 or not 32 <= args.height <= 4096:
        raise ConfigError("--top must be >= 1 and --height between 32 and 4096")
    query, image = load_image(args.query), load_image(args.image)
    model = model_from_args(args)
    picture, scores = explain_pair(model, query, image, top=args.top, heat=not args.no_heat,
                                   height=args.height, scales=args.scales, lam=args.lam)
    with atomic_path(out, suffix=out.suffix) as tmp:
        Image.fromarray(picture).save(tmp)
    print(f"{out}: global {scores['global']:.4f}, re-rank {scores['rerank']:.4f}, score {scores['score']:.4f}")
    return 0

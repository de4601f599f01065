"""`irkit verify A B`: how well do two images match? Global similarity, CVNet re-rank score, mixed."""
from __future__ import annotations

import argparse
import json
import math

from irkit.cli.common import add_model_args
from irkit.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="score one image pair (global similarity + re-rank score)",
                       description="Print the global descriptor similarity of IMAGE_A (the query) and IMAGE_B, "
                       "the re-ranker's probability that they show the same instance, and the mixed "
                       "score global + lambda * rerank used to re-rank search results.")
    p.add_argument("image_a", metavar="IMAGE_A", help="query image")
    p.add_argument("image_b", metavar="IMAGE_B", help="database image")
    p.add_argument("--lambda", dest="lam", type=float, default=0.5, help="weight of the re-rank score (default 0.5)")
    p.add_argument("--json", action="store_true", help='print {"global": ..., "rerank": ..., "score": ...}')
    add_model_args(p, default="cvnet-r50")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from irkit.cli.common import model_from_args
    from irkit.io.images import load_image
    from irkit.search.explain import verify_pair

    if not math.isfinite(args.lam):
        raise ConfigError(f"--lambda must be a finite number, got {args.lam}")
    img_a, img_b = load_image(args.image_a), load_image(args.image_b)
    model = model_from_args(args)
    scores = verify_pair(model, img_a, img_b, args.scales, args.lam)
    if args.json:
        print(json.dumps(scores))
    else:
        print(f"global similarity  {scores['global']:.4f}")
        print(f"re-rank score      {scores['rerank']:.4f}   (P(same instance), {args.model})")
        print(f"score              {scores['score']:.4f}   (global + {args.lam:g} x re-rank)")
    return 0

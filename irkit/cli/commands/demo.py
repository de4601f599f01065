"""`irkit demo`: index a sample photo collection, run its queries, print mAP, write an HTML page."""
from __future__ import annotations

import argparse
from pathlib import Path

from irkit.cli.common import add_model_args, model_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="end-to-end demo on sample photos (extract, search, evaluate, HTML)",
                       description="Build a small retrieval set from sample photos that ship with installable "
                       "packages, extract descriptors, rank, evaluate and write an HTML page of results.")
    p.add_argument("-o", "--output", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    p.add_argument("--photos", type=int, default=None, help="use only the first N sample photos")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from irkit.demo import DEMO_NAME, build_demo_dataset
    from irkit.eval.report import write_report
    from irkit.eval.revisitop import format_table
    from irkit.pipeline import evaluate_dataset

    from irkit.demo import demo_photos

    photos = demo_photos()[:args.photos] if args.photos else None
    data_dir = build_demo_dataset(args.output / "data", photos)
    model = model_from_args(args)
    run_ = evaluate_dataset(data_dir, DEMO_NAME, model, args.scales, cache_dir=args.output / "cache")
    html = write_report(run_.results, run_.ranks, run_.dataset.gnd, run_.dataset, args.output / "results.html",
                        title=f"irkit demo · {model.preset_name} · scales {list(run_.scales)}")
    print(f"demo: {run_.dataset.n_queries} queries, {run_.dataset.n_db} database images, "
          f"model {model.preset_name} ({getattr(model, 'weights_id', '?')}), scales {list(run_.scales)}")
    print(format_table(run_.results))
    print(f"ranked thumbnails: {html}")
    return 0

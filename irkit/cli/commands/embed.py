"""`irkit embed IMAGE… -o out.npy`: descriptors of a few images, one row per image, in input order."""
from __future__ import annotations

import argparse

import numpy as np

from irkit.cli.common import add_model_args, add_runtime_arg, model_from_args
from irkit.utils import atomic_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="write descriptors of images to a .npy file",
                       description="Compute global descriptors of the given images (rows in input order).")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("-o", "--output", required=True, help="output .npy ([N, D] float32)")
    add_model_args(p)
    add_runtime_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from irkit.extract import embed_files

    model = model_from_args(args)
    descs = embed_files(model, args.images, args.scales)
    with atomic_path(args.output, suffix=".npy") as tmp:
        np.save(tmp, descs)
    print(f"wrote {args.output}: {descs.shape[0]} x {descs.shape[1]} descriptors ({model.preset_name})")
    return 0

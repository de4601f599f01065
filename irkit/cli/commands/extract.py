"""`irkit extract`: descriptors of a collection or a revisitop dataset into a FeatureStore."""
from __future__ import annotations

import argparse

from irkit.cli.common import add_model_args, model_from_args
from irkit.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="extract descriptors into a feature store",
                       description="Extract global descriptors (and optional re-rank maps) of a folder, a "
                       ".txt/.csv list, or a revisitop dataset into a resumable feature store.")
    p.add_argument("source", nargs="?", help="folder of images or .txt/.csv list (or use --dataset)")
    p.add_argument("-o", "--store", required=True, help="feature store directory (created or resumed)")
    p.add_argument("--dataset", help="revisitop dataset name (database images; queries with --queries)")
    p.add_argument("--data-dir", help="revisitop data directory holding <dataset>/")
    p.add_argument("--queries", action="store_true", help="with --dataset: extract the cropped queries")
    p.add_argument("--maps", action="store_true", help="also store re-rank feature maps (CVNet)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="image decoding threads")
    p.add_argument("--distributed", action="store_true", help="run under torchrun: each rank extracts a "
                   "shard into STORE/shards/, rank 0 merges them into STORE (see irkit.shard)")
    p.add_argument("--runtime", choices=["torch", "onnx"], default="torch", help="onnx: run the model with "
                   "onnxruntime on CPU (--weights FILE.onnx, or the preset exported to a cached .onnx)")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from irkit.extract import extract_to_store

    if args.distributed:
        from irkit.shard import run_extract_cli

        return run_extract_cli(args)
    items = items_from_args(args)
    if args.runtime == "onnx":
        from irkit.export import onnx_model_from_args

        model = onnx_model_from_args(args)
    else:
        model = model_from_args(args)
    store = extract_to_store(model, items, args.store, scales=args.scales, with_maps=args.maps,
                             batch_size=args.batch_size, dtype=args.dtype, workers=args.workers,
                             optimize=args.runtime == "torch")
    print(f"{args.store}: {len(store)} descriptors ({model.preset_name}, dim {model.dim}); "
          f"{len(store.failures)} images failed (see the store's failure log)")
    return 0


def items_from_args(args: argparse.Namespace) -> list:
    from irkit.extract import Item

    if args.dataset:
        from irkit.data.revisitop import load_revisitop

        if not args.data_dir:
            raise ConfigError("--dataset needs --data-dir")
        ds = load_revisitop(args.data_dir, args.dataset)
        if args.queries:
            return [Item(n, str(p), b) for n, p, b in zip(ds.qimlist, ds.query_paths, ds.query_bbx)]
        return [Item(n, str(p)) for n, p in zip(ds.imlist, ds.db_paths)]
    if not args.source:
        raise ConfigError("give a folder or list file to extract, or --dataset NAME --data-dir DIR")
    from irkit.data.collection import load_collection

    col = load_collection(args.source)
    return [Item(i, str(p)) for i, p in zip(col.ids, col.paths)]

"""`irkit extract`: descriptors of a collection or a revisitop dataset into a FeatureStore."""
from __future__ import annotations

import argparse
from typing import Any

from irkit.cli.common import add_model_args, add_runtime_arg, model_from_args
from irkit.data.collection import load_collection
from irkit.data.revisitop import load_revisitop
from irkit.distributed import cleanup
from irkit.errors import ConfigError
from irkit.export import OnnxModel
from irkit.extract import Item, extract_to_store
from irkit.shard import extract_distributed, init_distributed


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
    add_runtime_arg(p)
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.distributed:
        return run_distributed(args)
    items = items_from_args(args)
    model, optimize = _model(args)
    store = extract_to_store(model, items, args.store, scales=args.scales, with_maps=args.maps,
                             batch_size=args.batch_size, dtype=args.dtype, workers=args.workers,
                             optimize=optimize)
    print(f"{args.store}: {len(store)} descriptors ({model.preset_name}, dim {model.dim}); "
          f"{len(store.failures)} images failed (see the store's failure log)")
    return 0


def run_distributed(args: argparse.Namespace) -> int:
    """``--distributed`` (inside torchrun): join the group, extract this rank's shard, rank 0 merges."""
    rank, world, args.device = init_distributed(getattr(args, "device", "auto"))
    clean = False
    try:
        items = items_from_args(args)
        model, optimize = _model(args)
        store = extract_distributed(model, items, args.store, rank=rank, world=world,
                                    batch_size=args.batch_size, scales=args.scales, with_maps=args.maps,
                                    dtype=args.dtype, workers=args.workers, optimize=optimize,
                                    progress=rank == 0)
        clean = True
    finally:
        cleanup(barrier=clean)  # on a clean exit wait for every rank before tearing the group down
    if rank == 0:
        print(f"{args.store}: {len(store)} descriptors merged from {world} shard(s) "
              f"({model.preset_name}, dim {model.dim}); {len(store.failures)} images failed")
        for f in store.failures:
            print(f"  failed: {f['id']} ({f['path']}): {f['reason']}")
    return 0


def _model(args: argparse.Namespace) -> tuple[Any, bool]:
    """The model to run and whether to optimise it for inference (torch only): ``--weights FILE.onnx``
    runs that exported file; otherwise the preset, on the runtime ``--runtime`` chooses."""
    if args.weights and str(args.weights).endswith(".onnx"):
        return OnnxModel(args.weights), False
    return model_from_args(args), True


def items_from_args(args: argparse.Namespace) -> list[Item]:
    """The images to extract: a revisitop dataset (database or cropped queries) or a collection."""
    if args.dataset:
        if not args.data_dir:
            raise ConfigError("--dataset needs --data-dir")
        ds = load_revisitop(args.data_dir, args.dataset)
        if args.queries:
            return [Item(n, str(p), b) for n, p, b in zip(ds.qimlist, ds.query_paths, ds.query_bbx)]
        return [Item(n, str(p)) for n, p in zip(ds.imlist, ds.db_paths)]
    if not args.source:
        raise ConfigError("give a folder or list file to extract, or --dataset NAME --data-dir DIR")
    col = load_collection(args.source)
    return [Item(i, str(p)) for i, p in zip(col.ids, col.paths)]

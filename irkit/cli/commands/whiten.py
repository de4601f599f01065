"""`irkit whiten --pool DIR -o lw.safetensors`: learn a whitening of a model's descriptors from a
labelled photo folder (one sub-folder per class; images of one class are matching pairs).

The descriptors of the pool are extracted with ``--model`` (default effnetlite2-gem, its default
scales unless ``--scales``) into a feature store (``--store``, default under the irkit cache, so
a second run with other options reuses them), then Lw (``--method lw``: learned from the pairs,
cirtorch's ``whitenlearn``) or PCA-whitening (``--method pca``) is learned with
:func:`irkit.nn.whitening.learn_whitening` and written with ``save_whitening``. Load it with the
``-lw`` preset: ``irkit eval --model effnetlite2-gem-lw --weights lw.safetensors ...``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from irkit.cli.common import add_model_args, model_from_args
from irkit.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("whiten", help="learn a whitening (Lw / PCA-w) from a labelled photo folder",
                       description="Learn Lw (from the matching pairs of a folder-per-class pool) or PCA-whitening "
                       "of a model's descriptors; load the file with the -lw preset (--weights).")
    p.add_argument("--pool", required=True, type=Path, help="folder with one sub-folder of images per class")
    p.add_argument("-o", "--output", required=True, type=Path, help="whitening file to write (.safetensors)")
    p.add_argument("--method", choices=["lw", "pca"], default="lw", help="lw (default) or pca")
    p.add_argument("--dims", type=int, default=None, help="directions kept (default: all)")
    p.add_argument("--shrinkage", type=float, default=0.1,
                   help="added to the eigenvalues, times their mean, before the inverse square root "
                        "(default 0.1; needed when the pool has fewer images than dimensions)")
    p.add_argument("--max-pairs-per-class", type=int, default=None, help="cap the pairs of each class")
    p.add_argument("--store", type=Path, help="feature store of the pool's descriptors (default: under the cache)")
    p.add_argument("--cache-dir", type=Path, help="cache root (default $IRKIT_CACHE or ~/.cache/irkit)")
    add_model_args(p, default="effnetlite2-gem")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from irkit.data.labelled import folder_per_class
    from irkit.extract import Item, check_scales, extract_to_store, model_config
    from irkit.nn.whitening import learn_whitening, save_whitening
    from irkit.store import config_hash
    from irkit.utils import cache_root

    if args.output.suffix != ".safetensors":
        raise ConfigError(f"-o {args.output}: the whitening file must end in .safetensors")
    model = model_from_args(args)
    if getattr(model, "whiten", None) is not None:
        raise ConfigError(f"--model {model.preset_name} already whitens; learn from the plain preset "
                          "(e.g. effnetlite2-gem)")
    pool = folder_per_class(args.pool)
    scales = check_scales(args.scales, model)
    store_dir = args.store or (cache_root(args.cache_dir) / "pools" / args.pool.resolve().name /
                               f"{model.preset_name}-{config_hash(model_config(model, scales, False))[:12]}")
    ids = [f"{pool.class_names[c]}/{i}" for i, c in zip(pool.ids, pool.labels.tolist())]
    store = extract_to_store(model, [Item(i, str(p)) for i, p in zip(ids, pool.paths)], store_dir, scales=scales,
                             dtype="float32")
    have = [k for k, i in enumerate(ids) if i in store]
    if len(have) < len(ids):
        print(f"warning: {len(ids) - len(have)} pool images failed to load and are left out")
    desc = np.asarray(store.descriptors(), dtype=np.float32)
    x = torch.from_numpy(np.stack([desc[store.index_of(ids[k])] for k in have]))
    labels = pool.labels[have]
    params = learn_whitening(x, labels, method=args.method, dims=args.dims, shrinkage=args.shrinkage,
                             max_pairs_per_class=args.max_pairs_per_class)
    save_whitening(params, args.output)
    print(f"wrote {args.output}: {args.method} whitening {tuple(params.projection.shape)} learned on {len(have)} "
          f"images of {len(np.unique(labels))} classes ({model.preset_name}, scales {list(scales)}); "
          f"use --model {model.preset_name}-lw --weights {args.output}")
    return 0

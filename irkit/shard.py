"""Distributed extraction: every rank extracts its shard into its own store, rank 0 merges.

Why this shape: a million images take hours on one process. Under ``torchrun`` each rank (one
per GPU, or one per few CPU cores; any number of machines) extracts a deterministic share of
the items into ``<store>/shards/rank-<r>-of-<W>``, a normal resumable FeatureStore: a killed rank
re-run skips what it already committed. After a barrier, rank 0 merges the shards into
``<store>`` in the *input order*; the merged store has the same model/config hash as a 1-rank
run, so the two are interchangeable.

Sharding is in contiguous blocks whose length is a multiple of the batch size. Every batch a
rank runs is then exactly a batch a 1-rank run would run (same images, same shapes), so the
descriptors are bit-identical to a 1-rank run, not merely close (batched convolutions are not
guaranteed to give the same bits for different batch compositions). One more condition: the
same number of intra-op threads per process (oneDNN's reductions depend on it; with
EfficientNet-Lite weights 1 vs 2 threads differ by ~3e-5, the float16 rounding step). torchrun
sets ``OMP_NUM_THREADS=1`` per rank, so compare with a 1-rank run under ``OMP_NUM_THREADS=1``;
when OMP_NUM_THREADS is unset, CPU ranks split the machine's cores between them. An image that
fails to decode is skipped, which shifts the batches after it differently in a 1-rank run and in
a shard: the descriptors then agree to float rounding, not bit for bit. Failures are recorded by
image id in each shard's failure log; a shard counts as finished when each of its images is
stored or recorded as failed, and the merged store lists the failed images in input order.

Usage (one machine, 4 processes; ``gloo`` on CPU, ``nccl`` when ``--device cuda``)::

    torchrun --nproc-per-node 4 -m irkit.extract FOLDER -o STORE [extract options]
    irkit extract FOLDER -o STORE --distributed      # inside torchrun, same thing

Several machines: start the same command on each with the usual rendezvous flags, e.g.
``torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST0:29500
--rdzv-id extract1 -m irkit.extract …`` (or ``--node-rank``/``--master-addr``/``--master-port``).
``STORE`` must be on storage every node sees (rank 0 reads all shards to merge them). Without
torchrun's environment (no ``WORLD_SIZE``) it runs as a single rank. The command line lives in
:mod:`irkit.cli.commands.extract`; this module is library code (it logs, it does not print).
"""
from __future__ import annotations

import datetime
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from irkit import distributed as D
from irkit.errors import ConfigError, StoreError
from irkit.extract import Item, extract_to_store
from irkit.models.base import GlobalModel
from irkit.store import MANIFEST, FeatureStore

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
#: rank 0 waits this long at the barrier for the slowest rank (extraction of a big shard takes hours)
DEFAULT_TIMEOUT = datetime.timedelta(hours=48)


def shard_dir(store_dir: str | os.PathLike, rank: int, world: int) -> Path:
    """``<store>/shards/rank-<r>-of-<W>``: the store rank ``rank`` of ``world`` writes."""
    return Path(store_dir) / SHARDS_DIR / f"rank-{rank}-of-{world}"


def shard_bounds(n: int, rank: int, world: int, block: int = 1) -> tuple[int, int]:
    """[start, stop) of rank ``rank``'s contiguous share of ``n`` items, cut at multiples of ``block``."""
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"rank {rank} is not in [0, {world})")
    block = max(1, int(block))
    n_blocks = -(-n // block)
    per = -(-n_blocks // world)
    return min(n, rank * per * block), min(n, (rank + 1) * per * block)


def shard_items(items: Sequence[Any], rank: int, world: int, block: int = 1) -> list[Any]:
    """Rank ``rank``'s share of ``items`` (see :func:`shard_bounds`); shares partition the list in order."""
    start, stop = shard_bounds(len(items), rank, world, block)
    return list(items[start:stop])


def init_distributed(device: str = "auto", timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> tuple[int, int, str]:
    """Join torchrun's process group for extraction (:func:`irkit.distributed.init_from_env` with
    the long barrier timeout); returns ``(rank, world, device)``, a CUDA device being this rank's GPU."""
    device = D.rank_device(device)
    rank, world, _ = D.init_from_env(device=device, timeout=timeout)
    return rank, world, device


# ---------------------------------------------------------------------------- extraction
def extract_shard(model: GlobalModel, items: Sequence[Item], store_dir: str | os.PathLike, rank: int, world: int,
                  *, batch_size: int = 8, **kwargs: Any) -> FeatureStore:
    """Extract rank ``rank``'s share of ``items`` into its shard store (resumable); returns that store.

    Items already in a merged ``store_dir`` (from an earlier complete run) are skipped.
    ``kwargs`` go to :func:`irkit.extract.extract_to_store` (scales, with_maps, dtype, workers, ...)."""
    mine = shard_items(items, rank, world, block=batch_size)
    merged = _open_if_store(Path(store_dir))
    if merged is not None:
        mine = [it for it in mine if it.id not in merged]
    log.info("rank %d/%d: %d items to extract into %s", rank, world, len(mine), shard_dir(store_dir, rank, world))
    store = extract_to_store(model, mine, shard_dir(store_dir, rank, world), batch_size=batch_size, **kwargs)
    store.close()
    return FeatureStore.open(store.root)


def extract_distributed(model: GlobalModel, items: Sequence[Item], store_dir: str | os.PathLike, *,
                        rank: int | None = None, world: int | None = None, merge: bool = True,
                        keep_shards: bool = True, batch_size: int = 8, **kwargs: Any) -> FeatureStore:
    """This rank's part of a distributed extraction: its shard, a barrier, then rank 0 merges.

    ``rank``/``world`` default to the process group's (join it first with :func:`init_distributed`).
    Returns the merged FeatureStore on rank 0 (when ``merge``), the rank's shard store elsewhere."""
    env_rank, env_world, _ = D.torchrun_env()
    if merge and env_world > 1 and not D.is_dist():
        raise ConfigError(f"WORLD_SIZE is {env_world} but no process group is initialised; call "
                          "irkit.shard.init_distributed() first (rank 0 must wait for the others before merging)")
    rank = (D.rank() if D.is_dist() else env_rank) if rank is None else rank
    world = (D.world_size() if D.is_dist() else env_world) if world is None else world
    items = list(items)
    shard = extract_shard(model, items, store_dir, rank, world, batch_size=batch_size, **kwargs)
    if not merge:
        return shard
    D.barrier()
    out = shard
    if rank == 0:
        out = merge_shards(store_dir, [it.id for it in items], world,
                           expected=[[it.id for it in shard_items(items, r, world, batch_size)]
                                     for r in range(world)], progress=kwargs.get("progress", True))
        if not keep_shards:
            shutil.rmtree(Path(store_dir) / SHARDS_DIR, ignore_errors=True)
    D.barrier()  # nobody returns (and maybe exits torchrun) before the merged store exists
    return out


# ---------------------------------------------------------------------------- merging
def _open_if_store(path: Path) -> FeatureStore | None:
    return FeatureStore.open(path) if (path / MANIFEST).is_file() else None


def merge_stores(shards: Sequence[str | os.PathLike], out_dir: str | os.PathLike, order: Sequence[str],
                 *, batch: int = 4096, progress: bool = True) -> FeatureStore:
    """Merge shard stores into ``out_dir`` with rows in the order of ``order`` (ids absent from every
    shard, e.g. images that failed, are skipped; their failure records are copied).

    Resumable: ids already in ``out_dir`` are not copied again, so a merge interrupted after any
    committed batch continues in order. All shards must share model, config, dim and dtype.
    Descriptors are copied in the shards' dtype (no rounding), re-rank maps included."""
    stores = [FeatureStore.open(p) for p in shards]
    if not stores:
        raise StoreError("no shard stores to merge")
    meta = stores[0].meta
    for s in stores[1:]:
        m = s.meta
        for key in ("model", "config_hash", "dim", "dtype"):
            if m[key] != meta[key]:
                raise StoreError(f"shard {s.root} has {key}={m[key]!r} but {stores[0].root} has {meta[key]!r}; "
                                 "shards of one merge must come from the same model and config")
    out = FeatureStore.open_or_create(out_dir, model=meta["model"], config=meta["config"], dim=meta["dim"],
                                      dtype=meta["dtype"])
    where: dict[str, tuple[int, int]] = {}
    for k, s in enumerate(stores):
        for row, id_ in enumerate(s.ids):
            where.setdefault(id_, (k, row))
    todo = [i for i in out.missing(order) if i in where]
    paths_of = [s.paths for s in stores]
    bar = tqdm(total=len(todo), desc="merge shards", unit="img", disable=not progress)
    for start in range(0, len(todo), batch):
        ids = todo[start:start + batch]
        src = np.array([where[i] for i in ids], dtype=np.int64).reshape(-1, 2)
        # float16 -> float32 -> float16 is exact, so reading through take() keeps every bit
        desc = np.empty((len(ids), meta["dim"]), dtype=np.float32)
        for k in np.unique(src[:, 0]):
            sel = src[:, 0] == k
            desc[sel] = stores[k].take(src[sel, 1])
        paths = [paths_of[k][row] for k, row in src]
        maps = [stores[k].get_map(row) for k, row in src] if meta.get("has_maps") else None
        out.add(ids, paths, desc, maps=maps, skip_existing=True)
        bar.update(len(ids))
    bar.close()
    failed: dict[str, dict] = {}
    for s in stores:
        for f in s.failures:
            if f["id"] is not None:  # records of pre-id stores cannot be matched to an image: retried instead
                failed.setdefault(f["id"], f)
    logged = {f["id"] for f in out.failures}
    for id_ in order:  # the merged failure log lists the bad images in input order, once each
        if id_ in failed and id_ not in logged and id_ not in out:
            out.log_failure(id_, failed[id_]["path"], failed[id_]["reason"])
    out.close()
    log.info("merged %d shard stores into %s (%d rows)", len(stores), out_dir, len(out))
    return FeatureStore.open(out_dir)


def merge_shards(store_dir: str | os.PathLike, order: Sequence[str], world: int,
                 expected: Sequence[Sequence[str]] | None = None, progress: bool = True) -> FeatureStore:
    """Merge ``<store>/shards/rank-*-of-<world>`` into ``<store>`` in the order of ``order``.

    With ``expected`` (the ids each rank had to extract), refuses (StoreError) when a shard is
    incomplete, naming the rank to re-run, instead of silently producing a partial store."""
    shards = [shard_dir(store_dir, r, world) for r in range(world)]
    merged = _open_if_store(Path(store_dir))
    for r, path in enumerate(shards):
        if not path.is_dir():
            raise StoreError(f"shard {path} is missing: rank {r} of {world} never ran; re-run the distributed "
                             "extraction (finished work is kept)")
        if expected is not None:
            s = _open_if_store(path)
            failed = {f["id"] for f in s.failures} if s is not None else set()
            done = (lambda i: (s is not None and i in s) or i in failed or (merged is not None and i in merged))
            left = [i for i in expected[r] if not done(i)]
            if left:
                raise StoreError(f"shard {path} lacks {len(left)} of its {len(expected[r])} images (e.g. {left[:3]}): "
                                 f"rank {r} did not finish; re-run the distributed extraction to resume it")
    return merge_stores(shards, store_dir, order, progress=progress)

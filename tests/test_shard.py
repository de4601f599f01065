"""Distributed extraction (irkit.shard): 2 gloo ranks on 127.0.0.1 give the 1-rank store exactly;
a rank killed mid-shard resumes without duplicates."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from irkit.errors import StoreError
from irkit.extract import Item, extract_to_store
from irkit.shard import extract_distributed, extract_shard, merge_shards, shard_bounds, shard_dir
from irkit.store import FeatureStore

SCALES = (1.0,)
BATCH = 3


def tiny_model():
    """Random-weight EfficientNet-Lite0 + GeM, seeded so every process builds the same weights."""
    from irkit.models.effnet import EffNetGeM

    torch.manual_seed(0)
    model = EffNetGeM("lite0", max_side=64).eval()
    model.preset_name, model.weights_id = "effnetlite0-gem", "random-seed0"
    return model


def make_items(folder: Path, n: int = 17) -> list[Item]:
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        h, w = (48, 64) if i % 3 else (64, 40)
        path = folder / f"im{i:02d}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        items.append(Item(f"im{i:02d}", str(path)))
    return items


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, items: list[Item], store: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), OMP_NUM_THREADS="1",
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from irkit.shard import init_distributed

    init_distributed("cpu")
    try:
        extract_distributed(tiny_model(), items, store, batch_size=BATCH, scales=SCALES, progress=False,
                            workers=0, flush_every=BATCH)
    finally:
        dist.destroy_process_group()


def _killed_rank(items: list[Item], store: str) -> None:
    """Rank 1 of 2, killed (os._exit, like kill -9) when it commits its third batch."""
    calls = {"n": 0}
    original = FeatureStore.add

    def add(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            os._exit(137)
        return original(self, *a, **kw)

    FeatureStore.add = add  # type: ignore[method-assign]
    torch.set_num_threads(1)
    extract_shard(tiny_model(), items, store, 1, 2, batch_size=BATCH, scales=SCALES, progress=False,
                  workers=0, flush_every=BATCH)


def _run_two_ranks(items: list[Item], store: Path) -> None:
    mp.spawn(_rank_main, args=(2, _free_port(), items, str(store)), nprocs=2, join=True)


def _same_store(a: FeatureStore, b: FeatureStore) -> None:
    assert a.ids == b.ids
    assert a.paths == b.paths
    assert a.meta["config_hash"] == b.meta["config_hash"]
    assert np.array_equal(np.asarray(a.descriptors()), np.asarray(b.descriptors()))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    (root / "img").mkdir()
    items = make_items(root / "img")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs (bits depend on the intra-op thread count)
    try:
        ref = extract_to_store(tiny_model(), items, root / "ref", batch_size=BATCH, scales=SCALES,
                               progress=False, workers=0)
        ref.close()
    finally:
        torch.set_num_threads(threads)
    return root, items, FeatureStore.open(root / "ref")


def test_shard_bounds_partition_in_blocks():
    for n, world, block in [(17, 2, 3), (5, 4, 2), (0, 3, 4), (100, 7, 8)]:
        spans = [shard_bounds(n, r, world, block) for r in range(world)]
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert all(start % block == 0 or start == n for start, _ in spans)


def test_two_ranks_equal_one_rank(setup):
    root, items, ref = setup
    _run_two_ranks(items, root / "dist")
    merged = FeatureStore.open(root / "dist")
    _same_store(merged, ref)
    assert [it.id for it in items] == merged.ids  # input order
    for r in range(2):  # each shard holds its own contiguous share
        start, stop = shard_bounds(len(items), r, 2, BATCH)
        assert FeatureStore.open(shard_dir(root / "dist", r, 2)).ids == [it.id for it in items[start:stop]]


def test_killed_rank_resumes_without_duplicates(setup):
    root, items, ref = setup
    store = root / "killed"
    proc = mp.get_context("spawn").Process(target=_killed_rank, args=(items, str(store)))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 137
    partial = FeatureStore.open(shard_dir(store, 1, 2))
    assert 0 < len(partial) < shard_bounds(len(items), 1, 2, BATCH)[1] - shard_bounds(len(items), 1, 2, BATCH)[0]
    with pytest.raises(StoreError, match="rank 0"):  # merging an unfinished job names the rank to re-run
        merge_shards(store, [it.id for it in items], 2,
                     expected=[[it.id for it in items[slice(*shard_bounds(len(items), r, 2, BATCH))]]
                               for r in range(2)], progress=False)
    done_before = partial.ids
    _run_two_ranks(items, store)
    shard = FeatureStore.open(shard_dir(store, 1, 2))
    assert shard.ids[:len(done_before)] == done_before and len(set(shard.ids)) == len(shard.ids)
    merged = FeatureStore.open(store)
    _same_store(merged, ref)
    _run_two_ranks(items, store)  # a third run has nothing to do and changes nothing
    _same_store(FeatureStore.open(store), ref)

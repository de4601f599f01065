"""FeatureStore: round trips, refusals, atomicity, kill -9 resume, maps, remove, failure log."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from irkit.errors import ConfigError, StoreError
from irkit.store import FeatureStore, config_hash

DIM = 8
CFG = {"scales": [0.7071, 1.0, 1.4142], "model": {"depth": 50}}


def vec(j: int, dim: int = DIM) -> np.ndarray:
    """Deterministic unit descriptor of image j (so a reopened store can be checked row by row)."""
    v = np.random.default_rng(j).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def fmap(j: int) -> np.ndarray:
    return np.random.default_rng(10_000 + j).standard_normal((3, 1 + j % 3, 2 + j % 2)).astype(np.float32)


def batch(lo: int, hi: int, dim: int = DIM):
    ids = [f"img-{j}" for j in range(lo, hi)]
    return ids, [f"/data/{i}.jpg" for i in ids], np.stack([vec(j, dim) for j in range(lo, hi)])


def make(tmp_path: Path, dtype: str = "float16", **kw) -> FeatureStore:
    return FeatureStore.open_or_create(tmp_path / "store", model="gem-r101", config=CFG, dim=DIM,
                                       dtype=dtype, **kw)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip(tmp_path, dtype):
    s = make(tmp_path, dtype)
    s.add(*batch(0, 5))
    s.add(*batch(5, 12))
    s.close()
    r = FeatureStore.open(tmp_path / "store")
    assert len(r) == 12 and r.ids == [f"img-{j}" for j in range(12)]
    assert r.paths[3] == "/data/img-3.jpg" and "img-7" in r and "img-99" not in r
    assert r.index_of("img-7") == 7
    d = r.descriptors()
    assert d.dtype == np.float32 and d.shape == (12, DIM)
    ref = np.stack([vec(j) for j in range(12)])
    np.testing.assert_allclose(d, ref, atol=1e-3 if dtype == "float16" else 0)
    np.testing.assert_allclose(r.take([11, 0, 5]), ref[[11, 0, 5]], atol=1e-3)
    m = r.meta
    assert m["model"] == "gem-r101" and m["dim"] == DIM and m["dtype"] == dtype and m["n"] == 12
    assert m["config"] == CFG and m["config_hash"] == config_hash(CFG)
    if dtype == "float32":  # compacted float32 reads as one memory map, no copy
        assert isinstance(d, np.memmap) or isinstance(d.base, np.memmap)
    with pytest.raises(StoreError, match="img-99"):
        r.index_of("img-99")


def test_config_hash_is_canonical():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    with pytest.raises(ConfigError):
        config_hash({"a": object()})


@pytest.mark.parametrize("change, value", [("model", "cvnet-r50"), ("config", {"scales": [1.0]}),
                                           ("dim", 16), ("dtype", "float32")])
def test_refuses_to_mix(tmp_path, change, value):
    make(tmp_path).add(*batch(0, 2))
    kw = dict(model="gem-r101", config=CFG, dim=DIM, dtype="float16")
    kw[change] = value
    with pytest.raises(StoreError) as err:
        FeatureStore.open_or_create(tmp_path / "store", **kw)
    msg = str(err.value)
    assert change in msg
    if change == "model":
        assert "gem-r101" in msg and "cvnet-r50" in msg
    if change == "dtype":
        assert "float16" in msg and "float32" in msg


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError):
        make(tmp_path, "int8")
    s = make(tmp_path)
    ids, paths, d = batch(0, 3)
    with pytest.raises(StoreError, match="shape"):
        s.add(ids, paths, d[:, :4])
    with pytest.raises(StoreError, match="match"):
        s.add(ids[:2], paths, d)
    with pytest.raises(StoreError, match="duplicate"):
        s.add(["a", "a"], ["p", "q"], d[:2])
    with pytest.raises(StoreError, match="NaN"):
        s.add(ids, paths, np.full_like(d, np.nan))
    with pytest.raises(StoreError, match="not a feature store"):
        FeatureStore.open(tmp_path / "nothing")
    assert len(s) == 0


def test_duplicates_skip_existing_and_missing(tmp_path):
    s = make(tmp_path)
    s.add(*batch(0, 4))
    with pytest.raises(StoreError, match="img-2"):
        s.add(*batch(2, 6))
    assert len(s) == 4
    assert s.missing([f"img-{j}" for j in range(6)]) == ["img-4", "img-5"]
    assert s.add(*batch(2, 6), skip_existing=True) == 2
    assert s.ids == [f"img-{j}" for j in range(6)]
    np.testing.assert_allclose(s.descriptors()[5], vec(5), atol=1e-3)
    assert s.add(*batch(0, 3), skip_existing=True) == 0


def test_interrupted_add_leaves_store_unchanged(tmp_path, monkeypatch):
    s = make(tmp_path)
    s.add(*batch(0, 3), maps=[fmap(j) for j in range(3)])
    gen = s.generation

    import irkit.store as store_mod

    def boom(*a, **k):
        raise KeyboardInterrupt  # as if Ctrl-C hit between the chunk files and the manifest
    monkeypatch.setattr(store_mod, "atomic_write_json", boom)
    with pytest.raises(KeyboardInterrupt):
        s.add(*batch(3, 6), maps=[fmap(j) for j in range(3, 6)])
    monkeypatch.undo()
    assert len(s) == 3 and s.generation == gen
    s.close(compact=False)
    # leftovers of the interruption: chunk files + maps bytes not in the manifest, a temp file
    (tmp_path / "store" / ".chunk-x.npy.abc.tmp").write_bytes(b"junk")
    r = FeatureStore.open(tmp_path / "store")
    assert r.ids == ["img-0", "img-1", "img-2"]
    r.add(*batch(3, 5), maps=[fmap(j) for j in range(3, 5)])  # writer open: orphans cleaned
    names = {p.name for p in (tmp_path / "store").iterdir()}
    assert names == {"manifest.json", "maps.bin", ".lock"} | {f"{c.name}{e}" for c in r._chunks
                                                              for e in (".npy", ".json")}
    assert (tmp_path / "store" / "maps.bin").stat().st_size == r.meta["maps_bytes"]
    for j in range(5):
        np.testing.assert_allclose(r.get_map(j), fmap(j), atol=1e-2)


CHILD = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, {tests!r})
    from test_store import batch, fmap, DIM, CFG
    from irkit.store import FeatureStore
    s = FeatureStore.open_or_create({root!r}, model="gem-r101", config=CFG, dim=DIM, max_chunks=6)
    j = len(s)
    print("ready", flush=True)
    while True:
        s.add(*batch(j, j + 7), maps=[fmap(i) for i in range(j, j + 7)])
        j += 7
""")


def _check_consistent(s: FeatureStore) -> int:
    n = len(s)
    assert s.ids == [f"img-{j}" for j in range(n)]  # no duplicates, no gaps
    assert len(set(s.ids)) == n
    d = s.descriptors()
    assert d.shape == (n, DIM)
    if n:
        np.testing.assert_allclose(d, np.stack([vec(j) for j in range(n)]), atol=1e-3)
        for j in {0, n // 2, n - 1}:
            np.testing.assert_allclose(s.get_map(j), fmap(j), atol=1e-2)
    return n


def test_resume_after_kill_9(tmp_path):
    root = str(tmp_path / "store")
    code = CHILD.format(tests=str(Path(__file__).parent), root=root)
    seen = 0
    for delay in (0.35, 0.6):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        s = FeatureStore.open(root)
        n = _check_consistent(s)
        assert n > seen, "the child made no progress"
        seen = n
    s = FeatureStore.open(root)
    s.add(*batch(seen, seen + 3), maps=[fmap(j) for j in range(seen, seen + 3)])
    s.close()
    assert _check_consistent(FeatureStore.open(root)) == seen + 3
    assert s.num_chunks == 1


def test_maps_round_trip(tmp_path):
    s = make(tmp_path, "float32")
    assert not s.has_maps
    s.add(*batch(0, 4), maps=[fmap(j) for j in range(4)])
    s.add(*batch(4, 6), maps=[fmap(j) for j in range(4, 6)])
    with pytest.raises(StoreError, match="maps"):
        s.add(*batch(6, 7))
    with pytest.raises(StoreError, match="channels"):
        s.add(*batch(6, 7), maps=[np.zeros((5, 2, 2), np.float32)])
    s.close()
    r = FeatureStore.open(tmp_path / "store")
    assert r.has_maps
    for j in range(6):
        m = r.get_map(j)
        assert m.dtype == np.float32 and m.shape == fmap(j).shape
        np.testing.assert_array_equal(m, fmap(j))
    no = make(tmp_path / "b")
    no.add(*batch(0, 1))
    with pytest.raises(StoreError, match="without re-rank maps"):
        no.add(*batch(1, 2), maps=[fmap(1)])
    with pytest.raises(StoreError, match="no re-rank maps"):
        no.get_map(0)


def test_remove(tmp_path):
    s = make(tmp_path, "float32")
    s.add(*batch(0, 5), maps=[fmap(j) for j in range(5)])
    s.add(*batch(5, 9), maps=[fmap(j) for j in range(5, 9)])
    gen = s.generation
    assert s.remove(["img-1", "img-6"]) == 2
    keep = [j for j in range(9) if j not in (1, 6)]
    assert s.generation == gen + 1 and len(s) == 7
    assert s.ids == [f"img-{j}" for j in keep] and s.index_of("img-7") == 5
    np.testing.assert_allclose(s.descriptors(), np.stack([vec(j) for j in keep]), atol=0)
    np.testing.assert_array_equal(s.get_map(5), fmap(7))
    with pytest.raises(StoreError, match="img-42"):
        s.remove(["img-42"])
    assert s.remove(["img-42"], missing_ok=True) == 0
    s.add(*batch(1, 2), maps=[fmap(1)])  # a removed id can come back
    assert s.ids[-1] == "img-1"
    s.close()
    r = FeatureStore.open(tmp_path / "store")
    assert r.num_chunks == 1 and r.ids == [f"img-{j}" for j in keep] + ["img-1"]
    np.testing.assert_allclose(r.descriptors(), np.stack([vec(j) for j in keep + [1]]), atol=0)
    np.testing.assert_array_equal(r.get_map(7), fmap(1))


def test_compaction_keeps_rows_and_bounds_chunks(tmp_path):
    s = make(tmp_path, max_chunks=4)
    for b in range(12):
        s.add(*batch(3 * b, 3 * b + 3))
        assert s.num_chunks <= 4
    np.testing.assert_allclose(s.descriptors(), np.stack([vec(j) for j in range(36)]), atol=1e-3)
    blocks = list(s.iter_descriptors(batch_size=5))
    assert all(len(b) <= 5 for _, b in blocks)
    streamed = np.zeros((36, DIM), np.float32)
    for start, b in blocks:
        streamed[start:start + len(b)] = b
    np.testing.assert_array_equal(streamed, s.descriptors())
    s.compact()
    assert s.num_chunks == 1 and s.ids == [f"img-{j}" for j in range(36)]
    assert len([p for p in (tmp_path / "store").iterdir() if p.name.startswith("chunk-")]) == 2


def test_one_writer_per_store(tmp_path):
    s = make(tmp_path)
    s.add(*batch(0, 1))
    other = FeatureStore.open(tmp_path / "store")
    with pytest.raises(StoreError, match="another process"):
        other.add(*batch(1, 2))
    s.close()
    other.add(*batch(1, 2))
    assert len(other) == 2


def test_failure_log(tmp_path):
    s = make(tmp_path)
    assert s.failures == []
    s.log_failure("bad", "/data/bad.jpg", "cannot identify image file")
    s.log_failure("huge", "/data/huge.png", "decompression bomb")
    with open(tmp_path / "store" / "failures.jsonl", "a") as fh:
        fh.write('{"id": "torn", "path": "/data/torn')  # a line torn by a crash
    f = FeatureStore.open(tmp_path / "store").failures
    assert [(x["id"], x["path"]) for x in f] == [("bad", "/data/bad.jpg"), ("huge", "/data/huge.png")]
    assert f[0]["reason"] == "cannot identify image file" and "time" in f[0]


def test_failure_records_need_an_id(tmp_path):
    s = make(tmp_path)
    for bad_id in (None, ""):
        with pytest.raises(StoreError, match="needs the image's id"):
            s.log_failure(bad_id, "/data/x.jpg", "broken")  # type: ignore[arg-type]
    assert s.failures == []


def test_failures_one_record_per_id_and_none_once_stored(tmp_path):
    """A retried image that fails again is listed once (latest reason); one extracted later is not listed."""
    s = make(tmp_path)
    s.log_failure("img-0", "/data/img-0.jpg", "truncated")
    s.log_failure("img-1", "/data/img-1.jpg", "empty file")
    s.log_failure("img-1", "/data/img-1.jpg", "still empty")
    assert [(f["id"], f["reason"]) for f in s.failures] == [("img-0", "truncated"), ("img-1", "still empty")]
    s.add(*batch(0, 1))  # img-0 was fixed and extracted by a later run
    assert [f["id"] for f in s.failures] == ["img-1"]
    with open(tmp_path / "store" / "failures.jsonl", "a") as fh:  # a record of a store older than ids
        fh.write('{"path": "/data/old.jpg", "reason": "corrupt", "time": 0}\n')
    f = FeatureStore.open(tmp_path / "store").failures
    assert [(x["id"], x["path"]) for x in f] == [("img-1", "/data/img-1.jpg"), (None, "/data/old.jpg")]


def test_search_while_adding(tmp_path):
    s = make(tmp_path, max_chunks=8)
    s.add(*batch(0, 10))
    errors: list[BaseException] = []

    def reader():
        try:
            for _ in range(200):
                d = s.descriptors()
                assert d.shape[0] >= 10 and d.shape[1] == DIM
                s.take([0, 9])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
    t = threading.Thread(target=reader)
    t.start()
    for b in range(1, 15):
        s.add(*batch(10 * b, 10 * b + 10))
    t.join()
    assert not errors
    assert s.ids == [f"img-{j}" for j in range(150)]
    assert json.loads((tmp_path / "store" / "manifest.json").read_text())["n"] == 150
    assert os.path.exists(tmp_path / "store" / ".lock")


def test_reader_follows_writer(tmp_path):
    w = make(tmp_path)
    w.add(*batch(0, 2))
    r = FeatureStore.open(tmp_path / "store")
    w.add(*batch(2, 5))
    assert len(r) == 2 and r.refresh() and len(r) == 5 and not r.refresh()
    np.testing.assert_allclose(r.descriptors()[4], vec(4), atol=1e-3)

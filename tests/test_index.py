"""Index: exact search vs numpy, approximate recall, -1 handling, persistence, staleness, errors."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from irkit.errors import ConfigError, StoreError
from irkit.search.index import Index, exact_knn, id_keys
from irkit.search.indexing import build_index, open_index
from irkit.store import FeatureStore


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, n_centres: int, noise: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((n_centres, dim)))
    x = centres[rng.integers(0, n_centres, n)] + noise * rng.standard_normal((n, dim)) / np.sqrt(dim)
    return unit(x)


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """The test machine is small and shared: OpenMP spinning across threads only slows tests down."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    x = clustered(6000, 32, 60, 0.5)
    q = unit(x[:50] + 0.2 * np.random.default_rng(2).standard_normal((50, 32)).astype(np.float32))
    return x, q


def brute(q, x, k):
    s = q @ x.T
    r = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, r, 1), r


def recall(rows, ref):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(rows, ref)])


def test_flat_equals_brute_force(data):
    x, q = data
    s, r = Index.build(x).search(q, 20)
    bs, br = brute(q, x, 20)
    assert s.dtype == np.float32 and r.dtype == np.int64 and r.shape == (50, 20)
    np.testing.assert_allclose(s, bs, atol=1e-5)
    assert recall(r, br) == 1.0
    es, er = exact_knn(q, x, 20, batch_size=700)  # streamed in blocks, no copy of x
    np.testing.assert_allclose(es, bs, atol=1e-5)
    assert recall(er, br) == 1.0


@pytest.mark.parametrize("factory, params, floor", [("IVF32,Flat", {"nprobe": 8}, 0.9),
                                                    ("HNSW16", {"ef_search": 128}, 0.9)])
def test_approximate_recall(data, factory, params, floor):
    x, q = data
    idx = Index.build(x, factory, **params)
    _, r = idx.search(q, 50)
    assert recall(r, brute(q, x, 50)[1]) >= floor
    if "nprobe" in params:
        assert idx.nprobe == 8 and idx.ef_search is None
        idx.nprobe = 32  # all lists: exact
        assert recall(idx.search(q, 50)[1], brute(q, x, 50)[1]) == 1.0
    else:
        assert idx.ef_search == 128 and idx.nprobe is None


def test_pq_rescore_improves_recall(data):
    x, q = data
    idx = Index.build(x, "IVF16,PQ8x4", nprobe=16, train_size=2000)  # 4-bit codes: cheap to train
    ref = brute(q, x, 10)
    plain = recall(idx.search(q, 10)[1], ref[1])
    s, r = idx.search(q, 10, rescore=True, rescore_k=300)
    assert recall(r, ref[1]) >= max(plain, 0.95)
    np.testing.assert_allclose(s, np.take_along_axis(q @ x.T, r, 1), atol=1e-5)  # exact scores
    assert np.all(np.diff(s, axis=1) <= 1e-6)


def test_in_place_and_gathered_rescore_give_the_exact_top_k_of_the_candidates(data, store, tmp_path):
    """The faiss path (array/memmap) and the numpy path (store) against brute force on their vectors."""
    x, q = data
    np.save(tmp_path / "x.npy", x)
    rng = np.random.default_rng(5)
    cand = np.stack([rng.choice(len(x), 40, replace=False) for _ in range(len(q))])
    cand[3, 25:] = -1  # faiss pads missing candidates at the end
    cand[4, :] = -1
    idx = Index.build(x[:10])
    for vectors, exact in ((np.load(tmp_path / "x.npy", mmap_mode="r"), x), (store, store.take(np.arange(6000)))):
        idx._vectors = vectors
        s, r = idx._rescore(q, cand, 30)
        for i in range(len(q)):
            valid = cand[i][cand[i] >= 0]
            want = np.sort(exact[valid] @ q[i])[::-1][:30]
            n = len(want)
            np.testing.assert_allclose(s[i, :n], want, atol=1e-5)
            np.testing.assert_allclose(exact[r[i, :n]] @ q[i], s[i, :n], atol=1e-5)
            assert set(r[i, :n]) <= set(valid) and (r[i, n:] == -1).all() and np.isneginf(s[i, n:]).all()


def test_missing_results_are_minus_one(data):
    x, q = data
    idx = Index.build(x[:7])
    for rescore in (False, True):
        s, r = idx.search(q[:3], 10, rescore=rescore)
        assert r.shape == (3, 10)
        assert (r[:, 7:] == -1).all() and np.isneginf(s[:, 7:]).all()
        assert sorted(r[0, :7]) == list(range(7))


def test_errors(data, tmp_path):
    x, q = data
    with pytest.raises(ConfigError, match="IVF12,Bogus"):
        Index.build(x, "IVF12,Bogus")
    with pytest.raises(ConfigError, match="PQ5"):
        Index.build(x, "IVF8,PQ5")  # 5 does not divide 32
    idx = Index.build(x)
    with pytest.raises(ConfigError, match=r"\[n, 32\]"):
        idx.search(q[:, :16], 5)
    with pytest.raises(ConfigError, match="k must be positive"):
        idx.search(q, 0)
    with pytest.raises(ConfigError, match="nprobe"):
        idx.nprobe = 4  # Flat has no lists
    with pytest.raises(ConfigError, match="IVF"):
        Index.build(x[:100], "IVF256,Flat")  # fewer vectors than lists
    with pytest.raises(StoreError, match="empty"):
        Index.build(np.zeros((0, 32), np.float32))
    empty = FeatureStore.open_or_create(tmp_path / "s", model="m", config={}, dim=32)
    with pytest.raises(StoreError, match="empty"):
        build_index(empty)
    with pytest.raises(StoreError, match="no index"):
        Index.load(tmp_path / "nope.faiss")
    with pytest.raises(ConfigError, match="rescore"):
        Index(idx.faiss_index, "Flat").search(q, 5, rescore=True)


@pytest.fixture
def store(tmp_path, data):
    x, _ = data
    s = FeatureStore.open_or_create(tmp_path / "store", model="m", config={"a": 1}, dim=32, max_chunks=3)
    for lo in range(0, 6000, 1000):
        s.add([f"i{j}" for j in range(lo, lo + 1000)], ["p"] * 1000, x[lo:lo + 1000])
    return s


def test_save_load_and_staleness(store, data, tmp_path):
    x, q = data
    idx = build_index(store, "IVF32,Flat", nprobe=4)
    path = tmp_path / "store" / "index.faiss"
    assert path.exists() and (tmp_path / "store" / "index.faiss.json").exists()
    loaded = Index.load(path, store=store)
    assert loaded.factory == "IVF32,Flat" and loaded.ntotal == 6000 and loaded.nprobe == 4
    s1, r1 = idx.search(q, 10)
    s2, r2 = loaded.search(q, 10)
    np.testing.assert_array_equal(r1, r2)
    _, r3 = loaded.search(q, 10, rescore=True, rescore_k=100)  # rescoring reads the store
    assert recall(r3, brute(q, store.descriptors(), 10)[1]) >= recall(r2, brute(q, x, 10)[1])
    store.add(["new"], ["p"], x[:1])
    with pytest.raises(StoreError, match="stale"):
        Index.load(path, store=store)
    synced = open_index(store, "IVF32,Flat", path)  # id-mapped: brought up to date, not rebuilt
    assert synced.ntotal == 6001 and Index.load(path, store=store).ntotal == 6001
    assert synced.counters == {"trains": 0, "adds": 1, "removes": 0}
    assert synced.search(x[:1], 2)[1][0].tolist() in ([0, 6000], [6000, 0])
    other = FeatureStore.open_or_create(tmp_path / "o", model="m2", config={}, dim=32)
    other.add(["a"], ["p"], x[:1])
    with pytest.raises(StoreError, match="another store"):
        Index.load(path, store=other)
    path.write_bytes(path.read_bytes()[:-10])  # index replaced without its sidecar
    with pytest.raises(StoreError, match="disagree"):
        Index.load(path)


def test_store_fp16_build_matches_array(store, data):
    x, q = data
    _, r_store = Index.build(store).search(q, 10)
    _, r_arr = Index.build(store.descriptors()).search(q, 10)
    assert recall(r_store, r_arr) == 1.0
    assert recall(r_store, brute(q, x, 10)[1]) >= 0.95  # float16 storage loses (almost) nothing


def test_cli_index(store, tmp_path):
    from irkit.cli.commands import index as cmd

    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers())
    out = tmp_path / "ivf.faiss"
    args = parser.parse_args(["index", str(store.root), "--factory", "IVF16,Flat", "--nprobe", "3",
                              "--dba", "2", "-o", str(out)])
    store.close()
    assert args.func(args) == 0
    idx = Index.load(out, store=FeatureStore.open(store.root))
    assert idx.factory == "IVF16,Flat" and idx.nprobe == 3 and idx.meta["dba"] == {"k": 2, "alpha": None}
    with pytest.raises(ConfigError, match="DBA"):
        idx.search(store.descriptors()[:2], 5, rescore=True)


def test_refine_index_k_factor_is_settable_and_raises_recall():
    """`IVF…,PQ…,RFlat`: faiss re-scores k * k_factor PQ candidates exactly; more is never worse here."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    exact = Index.build(x, "Flat", progress=False).search(x[:60], 10)[1]
    idx = Index.build(x, "IVF16,PQ4,RFlat", progress=False)
    idx.set_params(nprobe=8, k_factor=1)
    assert idx.nprobe == 8 and idx._param("k_factor") == 1

    def recall() -> float:
        got = idx.search(x[:60], 10)[1]
        return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)]))

    low = recall()
    idx.set_params(k_factor=16)
    assert recall() > low + 0.1
    with pytest.raises(ConfigError, match="k_factor"):
        Index.build(x, "IVF16,Flat", progress=False).set_params(k_factor=4)


def test_pq_adds_are_split_to_bound_faiss_temporaries(monkeypatch):
    """faiss PQ-encodes an add through an [n, M, 256] float table (16-D sub-vectors): irkit splits adds
    so that table stays under ADD_TEMP_BYTES, and the split changes nothing in the index."""
    import faiss

    import irkit.search.index as index_mod

    big = Index(Index.create(2048, "IVF4,PQ128,RFlat"), "IVF4,PQ128,RFlat")
    per_row = 4 * 2048 + 4 * 128 * 256
    assert big.add_batch_rows() == index_mod.ADD_TEMP_BYTES // per_row  # 1,927 rows: 256 MiB, not 8 GiB

    x = clustered(3000, 64, 30, 0.5, seed=4)
    monkeypatch.setattr(index_mod, "ADD_TEMP_BYTES", 700 * (4 * 64 + 4 * 8 * 256))  # 700-row adds
    idx = Index.build(x, "IVF8,PQ8", train_size=3000, progress=False)
    assert idx.add_batch_rows() == 700
    whole = faiss.clone_index(idx.faiss_index)  # same training, refilled in one add (no split)
    whole.reset()
    whole.add(np.concatenate([x, x[:1500]]))
    calls = []
    original_add = idx.faiss_index.add_with_ids
    monkeypatch.setattr(idx.faiss_index, "add_with_ids", lambda v, i: (calls.append(len(v)), original_add(v, i))[1])
    idx.add(x[:1500])
    assert calls == [700, 700, 100]

    whole = Index(whole, "IVF8,PQ8")
    idx.set_params(nprobe=8)
    whole.set_params(nprobe=8)
    assert idx.ntotal == whole.ntotal == 4500
    np.testing.assert_array_equal(idx.search(x[:40], 20)[1], whole.search(x[:40], 20)[1])


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "HNSW16", "IVF16,PQ8,RFlat"])
def test_add_and_remove_by_id_match_a_fresh_build(tmp_path, data, factory):
    """Adds and removes by id change nothing but those vectors: the result equals an index built
    from scratch on the final set (exactness made comparable with nprobe = all lists), through a
    save/load round trip; nothing is retrained."""
    x, q = data
    s = FeatureStore.open_or_create(tmp_path / "s", model="m", config={}, dim=32)
    s.add([f"i{j}" for j in range(3000)], ["p"] * 3000, x[:3000])
    idx = Index.build(s, factory, progress=False)
    trains = idx.counters["trains"]
    s.add([f"i{j}" for j in range(3000, 3200)], ["p"] * 200, x[3000:3200])
    idx.add(x[3000:3200], [f"i{j}" for j in range(3000, 3200)])
    gone = [f"i{j}" for j in range(0, 3200, 7)]
    s.remove(gone)
    assert idx.remove(gone + ["never-added"]) == len(gone)
    assert idx.counters["trains"] == trains and idx.ntotal == len(s) == 3200 - len(gone)
    idx.save(tmp_path / "i.faiss", store=s)
    idx = Index.load(tmp_path / "i.faiss", store=s)
    if idx.nprobe is not None:
        idx.nprobe = 16
    if factory.startswith("IVF16,PQ8"):
        idx.set_params(k_factor=64)
    if idx.ef_search is not None:
        idx.ef_search = 512
    _, rows = idx.search(q, 10)
    ref = brute(q, s.descriptors(), 10)[1]
    assert recall(rows, ref) >= (1.0 if factory in ("Flat", "IVF16,Flat") else 0.97)
    kept = set(range(len(s)))
    assert set(rows.ravel().tolist()) <= kept  # rows of the store as it is now, never a removed image


def test_open_index_syncs_incrementally_and_serves_what_the_user_built(tmp_path, data):
    x, q = data
    s = FeatureStore.open_or_create(tmp_path / "s", model="m", config={}, dim=32)
    s.add([f"i{j}" for j in range(2000)], ["p"] * 2000, x[:2000])
    built = build_index(s, "IVF16,Flat", nprobe=16)
    assert open_index(s).factory == "IVF16,Flat"  # no factory asked: the saved one
    s.add(["new1", "new2"], ["p", "p"], x[2000:2002])
    s.remove(["i5", "i6"])
    idx = open_index(s)
    assert idx.counters == {"trains": 0, "adds": 1, "removes": 1} and idx.ntotal == len(s)
    assert Index.load(built.meta["path"], store=s).ntotal == len(s)  # the synced index was saved
    _, rows = idx.search(x[2000:2002], 1)
    assert [s.ids[r] for r in rows[:, 0]] == ["new1", "new2"]
    assert open_index(s, "Flat").factory == "Flat"  # another factory asked for: rebuilt


def test_id_keys_are_stable_and_collisions_are_refused():
    a = id_keys(["a", "b", "ü/ä.jpg"])
    assert a.dtype == np.int64 and (a >= 0).all() and len(set(a.tolist())) == 3
    np.testing.assert_array_equal(a, id_keys(["a", "b", "ü/ä.jpg"]))  # no per-process salt
    x = unit(np.random.default_rng(0).standard_normal((2, 8)))
    with pytest.raises(ConfigError, match="ids"):
        Index.build(x, ids=["only-one"])
    with pytest.raises(StoreError, match="same 64-bit"):
        Index.build(x, ids=["dup", "dup"])
    row_keyed = Index.build(x)
    with pytest.raises(ConfigError, match="id-mapped"):
        row_keyed.remove(["a"])

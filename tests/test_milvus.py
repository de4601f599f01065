"""Milvus backend on Milvus Lite: exact FLAT search agrees with faiss, add/remove by id, clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="the Milvus backend is the optional extra irkit[milvus]")
pytest.importorskip("milvus_lite", reason="Milvus Lite (irkit[milvus]) runs the embedded tests")

from irkit.cli import main as cli_main  # noqa: E402
from irkit.errors import StoreError  # noqa: E402
from irkit.search.index import Index  # noqa: E402
from irkit.search.milvus_index import (MilvusIndex, build_milvus_index, is_lite_uri,  # noqa: E402
                                       open_milvus_index)
from irkit.store import FeatureStore  # noqa: E402

DIM = 32


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def store(tmp_path):
    st = FeatureStore.open_or_create(tmp_path / "store", model="test", config={"m": 1}, dim=DIM, dtype="float32")
    x = _vectors(400)
    st.add([f"img{i:04d}" for i in range(len(x))], [f"/p/img{i:04d}.jpg" for i in range(len(x))], x)
    return st


def test_uri_kinds():
    assert is_lite_uri("./irkit.db") and is_lite_uri("/data/x.db")
    assert not is_lite_uri("http://host:19530") and not is_lite_uri("https://x.zillizcloud.com")


def test_flat_matches_exact_faiss(store, tmp_path):
    index = build_milvus_index(store, uri=str(tmp_path / "m.db"), progress=False)
    assert index.ntotal == len(store) and index.dim == DIM and index.describe()["metric"] == "IP"
    q = _vectors(25, seed=1)
    s_m, r_m = index.search(q, 10)
    s_f, r_f = Index.build(store, "Flat", progress=False).search(q, 10)
    np.testing.assert_array_equal(r_m, r_f)
    np.testing.assert_allclose(s_m, s_f, atol=1e-5)
    # more than there is: padded like faiss
    s, r = index.search(q[:2], 500)
    assert (r[:, 400:] == -1).all() and np.isneginf(s[:, 400:]).all() and (r[:, :400] >= 0).all()
    meta = json.loads((store.root / "index.milvus.json").read_text())
    assert meta["backend"] == "milvus" and meta["collection"] == index.collection and meta["index_type"] == "FLAT"


def test_add_remove_and_sync(store, tmp_path):
    index = build_milvus_index(store, uri=str(tmp_path / "m.db"), progress=False)
    new = _vectors(3, seed=7)
    store.add(["new0", "new1", "new2"], ["/p/n0.jpg", "/p/n1.jpg", "/p/n2.jpg"], new)
    index.add(new, ["new0", "new1", "new2"])
    assert index.ntotal == 403
    _, rows = index.search(new, 1)
    assert [store.ids[r] for r in rows[:, 0]] == ["new0", "new1", "new2"]

    assert index.remove(["new1", "img0005", "never-added"]) == 2
    assert index.ntotal == 401
    _, rows = index.search(np.stack([new[1], store.take([store.index_of("img0005")])[0]]), 3)
    found = {store.ids[r] for r in rows.ravel() if r >= 0}
    assert "new1" not in found and "img0005" not in found

    # the store changes behind the collection's back: reopening syncs both ways
    store.remove(["img0010", "img0011"])
    reopened = open_milvus_index(store)
    assert reopened.ntotal == len(store) == 401   # new1/img0005 re-added from the store, img0010/11 gone
    _, rows = reopened.search(store.take([store.index_of("img0005")]), 1)
    assert store.ids[rows[0, 0]] == "img0005"


def test_refuses_other_dimension_and_metric(store, tmp_path):
    uri = str(tmp_path / "m.db")
    build_milvus_index(store, uri=uri, collection="coll", progress=False)
    with pytest.raises(StoreError, match="holds 32-D vectors, the store has 16-D"):
        MilvusIndex.open(uri, "coll", 16)
    import pymilvus

    client = pymilvus.MilvusClient(uri)
    schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("key", pymilvus.DataType.INT64, is_primary=True)
    schema.add_field("vector", pymilvus.DataType.FLOAT_VECTOR, dim=DIM)
    params = client.prepare_index_params()
    params.add_index(field_name="vector", index_type="FLAT", metric_type="L2")
    client.create_collection("l2coll", schema=schema, index_params=params)
    with pytest.raises(StoreError, match="metric L2"):
        MilvusIndex.open(uri, "l2coll", DIM)
    with pytest.raises(StoreError, match="no collection 'absent'"):
        MilvusIndex.open(uri, "absent", DIM, create=False)


def test_unreachable_server_is_a_clear_error():
    with pytest.raises(StoreError, match="cannot reach Milvus at http://127.0.0.1:1"):
        MilvusIndex.open("http://127.0.0.1:1", "x", DIM, timeout=1, retries=2)


def test_cli_index_backend_milvus(store, tmp_path, capsys):
    store.close()
    uri = str(tmp_path / "cli.db")
    assert cli_main(["index", str(tmp_path / "store"), "--backend", "milvus", "--uri", uri,
                     "--collection", "photos"]) == 0
    assert "milvus collection photos" in capsys.readouterr().out
    st = FeatureStore.open(tmp_path / "store")
    index = open_milvus_index(st)
    assert index.collection == "photos" and index.ntotal == 400
    assert cli_main(["index", str(tmp_path / "store"), "--backend", "milvus", "--factory", "HNSW32"]) == 1

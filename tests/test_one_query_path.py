"""One query path: `irkit search`, SearchEngine and POST /search give the same ids and scores; the
service serves the index `irkit index` built and keeps it current by id, without rebuilding it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import serve_tiny
from serve_tiny import png_bytes
from irkit.cli import main
from irkit.io.images import load_image
from irkit.ranking import Ranking
from irkit.search.engine import SearchEngine, SearchOptions
from irkit.serve.app import create_app

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return serve_tiny.build_store(tmp_path_factory.mktemp("qp"), n=24)


@pytest.fixture(scope="module")
def query(store: Path) -> Path:
    path = store.parent / "query.png"
    img = np.asarray(Image.open(store.parent / "images" / "img006.png")).astype(int)
    noise = np.random.default_rng(5).integers(-25, 25, img.shape)
    Image.fromarray(np.clip(img + noise, 0, 255).astype(np.uint8)).save(path)
    return path


CASES = {
    "global": {},
    "alpha-QE": {"qe": "alpha"},
    "AQE": {"qe": "aqe"},
    "spatial": {"rerank": "spatial"},
    "cvnet": {"rerank": "cvnet"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_ids_and_scores_through_cli_api_and_http(store, query, case, capsys):
    opts = CASES[case]
    api = SearchEngine.open(store).search(load_image(query), k=6, **opts)
    args = ["search", str(query), "--store", str(store), "--k", "6", "--json"]
    for name, value in opts.items():
        args += [f"--{name}", value]
    assert main(args) == 0
    cli = json.loads(capsys.readouterr().out)[0]["results"]
    with TestClient(create_app(store)) as client:
        r = client.post("/search", files={"image": ("q.png", query.read_bytes(), "image/png")},
                        data={"k": "6", **opts})
    assert r.status_code == 200, r.text
    http = r.json()["results"]
    assert len(api) == 6
    for other in (cli, http):
        assert [h["id"] for h in other] == [h["id"] for h in api]
        np.testing.assert_allclose([h["score"] for h in other], [h["score"] for h in api], rtol=0, atol=1e-6)
        assert [h["stage"] for h in other] == [h["stage"] for h in api]
    expected_stage = {"global": "global", "alpha-QE": "qe", "AQE": "qe"}.get(case, opts.get("rerank"))
    assert {h["stage"] for h in api} == {expected_stage}


def test_search_output_is_a_ranking_file(store, query, tmp_path, capsys):
    out = tmp_path / "ranking.npz"
    assert main(["search", str(query), str(store.parent / "images" / "img011.png"), "--store", str(store),
                 "--k", "5", "-o", str(out)]) == 0
    ranking = Ranking.load(out)
    assert ranking.query_ids == ["query", "img011"] and ranking.depth == 5
    assert ranking.hits(1)[0]["id"] == "img011" and ranking.hits(0)[0]["stage"] == "global"
    imlist = [f"img{i:03d}" for i in range(24)]
    ranks = ranking.to_ranks(imlist, ["img011", "query"])
    assert ranks.shape == (5, 2) and ranks[0, 0] == 11


def test_service_serves_the_built_ivfpq_index_and_updates_it_by_id(tmp_path):
    store = serve_tiny.build_store(tmp_path, n=64)
    assert main(["index", str(store), "--factory", "IVF2,PQ4x4", "--nprobe", "2"]) == 0
    with TestClient(create_app(store, token=TOKEN, options=SearchOptions(rescore=64))) as client:
        engine = client.app.state.engine
        index = engine.index
        stats = client.get("/stats").json()["index"]
        assert stats["factory"] == "IVF2,PQ4x4" and stats["ntotal"] == 64 and stats["counters"]["trains"] == 0
        for batch in range(4):  # 100 adds in 4 requests
            ids = [f"new{batch * 25 + i:03d}" for i in range(25)]
            files = [("images", (f"{i}.png", png_bytes(1000 + batch * 25 + j, 64), "image/png")) for j, i in enumerate(ids)]
            r = client.post("/images", headers=AUTH, files=files, data={"ids": ",".join(ids)})
            assert r.status_code == 201, r.text
        gone = [f"new{i:03d}" for i in range(0, 100, 2)] + [f"img{i:03d}" for i in range(0, 64, 2)] + \
            [f"img{i:03d}" for i in range(1, 37, 2)]
        for image_id in gone:  # 100 deletes
            assert client.delete(f"/images/{image_id}", headers=AUTH).status_code == 200
        stats = client.get("/stats").json()["index"]
        assert engine.index is index  # the same index object throughout: never rebuilt
        assert stats["counters"]["trains"] == 0 and stats["ntotal"] == 64 and stats["factory"] == "IVF2,PQ4x4"
        for image_id in ("new001", "new051", "img041"):  # PQ shortlist re-scored exactly from the store
            hits = client.post("/search", json={"id": image_id, "k": 64}).json()["results"]
            assert hits[0]["id"] == image_id and hits[0]["score"] == pytest.approx(1.0, abs=2e-3)
            assert len(hits) == 64 and not set(gone) & {h["id"] for h in hits}
    # restarted: the index saved at shutdown is loaded as it was (no rebuild, no retraining)
    with TestClient(create_app(store, token=TOKEN)) as client:
        stats = client.get("/stats").json()["index"]
        assert stats["ntotal"] == 64 and stats["counters"] == {"trains": 0, "adds": 0, "removes": 0}


def test_engine_and_service_search_options_have_one_default():
    from irkit.serve.engine import Engine

    assert SearchOptions().qe_k == 2
    assert Engine.__init__.__defaults__[-1] is None  # the service takes SearchOptions() unless told otherwise


def test_search_ranking_file_scores_like_the_dataset_pipeline(tmp_path, capsys):
    """`irkit search … -o` on a revisitop-layout set, then `irkit eval --ranking`: the same numbers as
    the dataset pipeline's own ranking cut to the same depth (compute_map on a top-k ranking)."""
    import pickle

    from irkit.eval.revisitop import evaluate_ranks
    from irkit.models.registry import build_model
    from irkit.pipeline import evaluate_dataset

    serve_tiny.register()
    jpg = tmp_path / "toy" / "jpg"
    pngs = serve_tiny.make_images(tmp_path / "png", 16, seed=3)
    names = [p.stem for p in pngs]
    jpg.mkdir(parents=True)
    for p in pngs:
        Image.open(p).save(jpg / f"{p.stem}.jpg", quality=95)
    queries = names[0:8:2]  # each query's partner (i + 1) is its positive, the rest negatives
    gnd = [{"bbx": [0, 0, 64, 64], "easy": [i + 1], "hard": [i + 8], "junk": [i]} for i in range(0, 8, 2)]
    with open(tmp_path / "toy" / "gnd_toy.pkl", "wb") as fh:
        pickle.dump({"imlist": names, "qimlist": queries, "gnd": gnd}, fh)
    store = tmp_path / "store"
    assert main(["extract", str(jpg), "-o", str(store), "--model", serve_tiny.PRESET]) == 0
    out = tmp_path / "r.npz"
    assert main(["search", *[str(jpg / f"{q}.jpg") for q in queries], "--store", str(store), "--k", "6",
                 "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "--ranking", str(out), "--gnd", str(tmp_path / "toy" / "gnd_toy.pkl"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    run = evaluate_dataset(tmp_path, "toy", build_model(serve_tiny.PRESET), cache_dir=tmp_path / "cache",
                           progress=False)
    want = evaluate_ranks(run.ranks[:6], run.dataset.gnd, n_db=16)
    for protocol in ("easy", "medium", "hard"):
        for metric in ("map", "mp@1", "mp@5"):
            assert got[protocol][metric] == pytest.approx(want[protocol][metric], abs=1e-9)
    assert main(["eval", "--ranking", str(out), "--dataset", "toy", "--data-dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == got


def test_cli_api_and_service_search_a_milvus_collection(tmp_path, query, capsys):
    """`irkit index --backend milvus`: the same engine then searches the collection everywhere, and
    the service's adds and deletes go to it by id."""
    pytest.importorskip("pymilvus", reason="the Milvus backend is the optional extra irkit[milvus]")
    pytest.importorskip("milvus_lite", reason="Milvus Lite (irkit[milvus]) runs the embedded tests")
    store = serve_tiny.build_store(tmp_path, n=24)
    assert main(["index", str(store), "--backend", "milvus", "--milvus-index", "FLAT"]) == 0
    capsys.readouterr()
    engine = SearchEngine.open(store)
    assert engine.index.describe()["backend"] == "milvus"
    api = engine.search(load_image(query), k=5)
    assert main(["search", str(query), "--store", str(store), "--k", "5", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)[0]["results"]
    assert [h["id"] for h in cli] == [h["id"] for h in api]
    exact = SearchEngine.open(store, factory="Flat").search(load_image(query), k=5)
    assert [h["id"] for h in api] == [h["id"] for h in exact]
    np.testing.assert_allclose([h["score"] for h in api], [h["score"] for h in exact], atol=1e-5)
    del engine
    with TestClient(create_app(store, token=TOKEN)) as client:
        http = client.post("/search", files={"image": ("q.png", query.read_bytes(), "image/png")},
                           data={"k": "5"}).json()["results"]
        assert [h["id"] for h in http] == [h["id"] for h in api]
        r = client.post("/images", headers=AUTH, files={"images": ("n.png", png_bytes(77, 64), "image/png")},
                        data={"ids": "added"})
        assert r.status_code == 201, r.text
        assert client.delete("/images/img003", headers=AUTH).status_code == 200
        index = client.app.state.engine.index
        assert index.ntotal == 24
        hits = client.post("/search", json={"id": "added", "k": 24}).json()["results"]
        assert hits[0]["id"] == "added" and "img003" not in {h["id"] for h in hits}


def test_eval_takes_lambda_and_topk_from_the_rerank_json_beside_the_weights(tmp_path, capsys):
    """A trained re-ranker's λ/top-k were chosen on its validation classes (rerank.json beside the
    checkpoint): `irkit eval --rerank cvnet --weights …` uses them unless given on the command line."""
    import pickle

    import torch

    from irkit.models.registry import build_model

    serve_tiny.register()
    jpg = tmp_path / "toy" / "jpg"
    jpg.mkdir(parents=True)
    names = []
    for p in serve_tiny.make_images(tmp_path / "png", 8, seed=4):
        Image.open(p).save(jpg / f"{p.stem}.jpg", quality=95)
        names.append(p.stem)
    gnd = [{"bbx": [0, 0, 64, 64], "easy": [i + 1], "hard": [], "junk": [i]} for i in range(0, 8, 2)]
    with open(tmp_path / "toy" / "gnd_toy.pkl", "wb") as fh:
        pickle.dump({"imlist": names, "qimlist": names[0:8:2], "gnd": gnd}, fh)
    weights = tmp_path / "run" / "best.pth"
    weights.parent.mkdir()
    torch.save(build_model(serve_tiny.PRESET).state_dict(), weights)
    (weights.parent / "rerank.json").write_text(json.dumps({"lambda": 0.0, "topk": 3}))
    args = ["eval", "--dataset", "toy", "--data-dir", str(tmp_path), "--model", serve_tiny.PRESET,
            "--weights", str(weights), "--rerank", "cvnet", "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "top 3" in out and "lambda 0.0, from rerank.json" in out
    assert main(args + ["--lambda", "0.5"]) == 0
    assert "top 3" in (out := capsys.readouterr().out) and "lambda 0.5," in out


def test_an_empty_store_opens_and_fills_by_adds(tmp_path):
    """open_index of an empty store: an exact index keyed by id (nothing to train on yet) that adds fill."""
    from irkit.extract import model_config
    from irkit.models.registry import build_model
    from irkit.search.indexing import open_index
    from irkit.store import FeatureStore

    serve_tiny.register()
    model = build_model(serve_tiny.PRESET)
    cfg = model_config(model, model.default_scales, True)
    FeatureStore.open_or_create(tmp_path / "s", model=model.preset_name, config=cfg, dim=model.dim).close()
    assert open_index(FeatureStore.open(tmp_path / "s"), "IVF4,Flat").factory == "Flat"
    engine = SearchEngine.open(tmp_path / "s", model=model)
    img = np.asarray(Image.open(serve_tiny.make_images(tmp_path / "img", 1)[0]).convert("RGB"))
    assert engine.search(img, k=3) == []
    desc, fmap = engine.embed_with_map(img)
    engine.add(["first"], ["first.png"], desc[None], maps=[fmap])
    assert [h["id"] for h in engine.search(img, k=3)] == ["first"] and engine.index.counters["trains"] == 0

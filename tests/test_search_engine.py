"""Searching a store from Python and the CLI: index, QE, re-ranking, refusal of a different model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from irkit.cli import main
from irkit.data.synthetic_pairs import ViewConfig, make_textured_scene, random_view
from irkit.errors import StoreError
from irkit.extract import Item, extract_to_store
from irkit.models.registry import build_model
from irkit.search.engine import SearchEngine
from tiny_model import NAME, _tiny


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """Four scenes, each seen twice, in a store of the tiny model."""
    rng = np.random.default_rng(0)
    cfg = ViewConfig(out_size=(96, 128), occlusion_prob=0.0, blur_prob=0.0)
    items = []
    for s in range(4):
        scene = make_textured_scene((120, 160), rng=s)
        for v in range(2):
            path = tmp_path / "imgs" / f"scene{s}_{v}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(random_view(scene, rng, cfg).image).save(path)
            items.append(Item(path.stem, str(path)))
    extract_to_store(build_model(NAME), items, tmp_path / "store", progress=False).close()
    return tmp_path / "store"


def test_search_ranks_the_image_itself_first_and_matches_brute_force(store_dir: Path) -> None:
    engine = SearchEngine.open(store_dir)
    query = store_dir.parent / "imgs" / "scene2_1.png"
    hits = engine.search_file(query, k=8)
    assert hits[0]["id"] == "scene2_1" and hits[0]["score"] == pytest.approx(1.0, abs=2e-3)
    q = engine.embed(np.asarray(Image.open(query).convert("RGB")))
    brute = engine.store.descriptors() @ q
    assert [h["id"] for h in hits] == [engine.store.ids[i] for i in np.argsort(-brute, kind="stable")]
    # alpha-QE, checked against the formula: q' = L2(q + sum_i max(s_i, 0)^3 x_i) over the top 2
    db = engine.store.descriptors()
    top = np.argsort(-brute, kind="stable")[:2]
    q2 = q + ((np.maximum(brute[top], 0) ** 3)[:, None] * db[top]).sum(0)
    q2 /= np.linalg.norm(q2)
    expanded = engine.search_file(query, k=5, qe="alpha", qe_k=2)
    assert [h["id"] for h in expanded] == [engine.store.ids[i] for i in np.argsort(-(db @ q2), kind="stable")[:5]]
    np.testing.assert_allclose([h["score"] for h in expanded], np.sort(db @ q2)[::-1][:5], atol=1e-5)
    assert {h["stage"] for h in expanded} == {"qe"} and {h["stage"] for h in hits} == {"global"}
    # spatial re-ranking of the shortlist: final = global + lambda * inlier score, top stays exact
    reranked = engine.search_file(query, k=3, rerank="spatial", topk=4, lam=0.5)
    assert reranked[0]["id"] == "scene2_1" and reranked[0]["score"] >= reranked[0]["global"]
    assert reranked[0]["stage"] == "spatial"


def test_rescore_makes_a_quantised_index_exact(store_dir: Path, capsys) -> None:
    engine = SearchEngine.open(store_dir, factory="SQ4")  # 4-bit scalar quantiser: lossy scores
    query = store_dir.parent / "imgs" / "scene1_0.png"
    q = engine.embed(np.asarray(Image.open(query).convert("RGB")))
    brute = engine.store.descriptors() @ q
    approx = engine.search_file(query, k=8)
    assert max(abs(h["score"] - brute[engine.store.ids.index(h["id"])]) for h in approx) > 1e-3
    exact = engine.search_file(query, k=8, rescore=8)
    assert [h["id"] for h in exact] == [engine.store.ids[i] for i in np.argsort(-brute, kind="stable")]
    np.testing.assert_allclose([h["score"] for h in exact], np.sort(brute)[::-1], atol=1e-5)
    assert main(["search", str(query), "--store", str(store_dir), "--factory", "SQ4", "--rescore", "8", "--k",
                 "2", "--json"]) == 0
    assert [h["id"] for h in json.loads(capsys.readouterr().out)[0]["results"]] == [h["id"] for h in exact[:2]]


def test_search_refuses_a_model_other_than_the_one_that_built_the_store(store_dir: Path, tmp_path: Path) -> None:
    other = _tiny()
    other.weights_id = "something-else"
    with pytest.raises(StoreError, match="weights"):
        SearchEngine.open(store_dir, model=other)


def test_search_command_json(store_dir: Path, capsys) -> None:
    query = store_dir.parent / "imgs" / "scene0_0.png"
    assert main(["search", str(query), "--store", str(store_dir), "--k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["query"] == str(query) and [h["id"] for h in out[0]["results"]][0] == "scene0_0"
    assert len(out[0]["results"]) == 3
    assert main(["search", str(query), "--store", str(store_dir), "--k", "0"]) == 1

"""The fast CVNet re-ranking path against its references: the channels-last center-pivot conv4d and
GroupNorm against the plain definitions, packed prepared levels (what stores now keep) against the
raw-map path, and the scorer over both kinds of store against the published order of operations."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from irkit.errors import ConfigError
from irkit.extract import Item, extract_to_store
from irkit.models.cvnet import CVNetReranker
from irkit.models.registry import build_model
from irkit.nn.conv4d import (center_pivot_conv4d_cl, conv4d_reference, from_channels_last_4d, group_norm_cl,
                             to_channels_last_4d)
from irkit.search.engine import SearchEngine
from irkit.search.rerank import CVNetScorer
from irkit.store import FeatureStore

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def reranker() -> CVNetReranker:
    torch.manual_seed(0)
    rr = CVNetReranker().eval()
    for m in rr.cv_learner.modules():      # non-trivial GroupNorm affine parameters
        if isinstance(m, torch.nn.GroupNorm):
            m.weight.data.normal_(1.0, 0.3)
            m.bias.data.normal_(0.0, 0.3)
    return rr


@pytest.mark.parametrize("shape,out_ch,k,stride", [
    ((2, 3, 7, 6, 5, 9), 4, 3, 2),     # odd sizes, stride 2
    ((1, 5, 6, 4, 7, 5), 6, 5, 2),     # kernel 5 (the first layer's)
    ((2, 4, 5, 5, 4, 6), 3, 3, 1),
])
def test_channels_last_conv4d_equals_the_reference(shape, out_ch, k, stride) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    wq, wk = torch.randn(out_ch, shape[1], k, k, generator=g), torch.randn(out_ch, shape[1], k, k, generator=g)
    bq, bk = torch.randn(out_ch, generator=g), torch.randn(out_ch, generator=g)
    ref = conv4d_reference(x.double(), wq.double(), bq.double(), wk.double(), bk.double(), stride)
    got = center_pivot_conv4d_cl(to_channels_last_4d(x), wq, bq, wk, bk, stride)
    assert got.is_contiguous() and got.shape == ref.permute(0, 2, 3, 4, 5, 1).shape
    torch.testing.assert_close(from_channels_last_4d(got).double(), ref, atol=1e-4, rtol=1e-5)


def test_channels_last_group_norm_equals_nn_group_norm() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 6, 7, 5, 6, generator=g) * 3 + 5        # a large mean: cancellation-prone
    gn = torch.nn.GroupNorm(4, 8)
    gn.weight.data.normal_(generator=g)
    gn.bias.data.normal_(generator=g)
    with torch.no_grad():
        ref = torch.relu(torch.nn.functional.group_norm(x.double(), 4, gn.weight.double(), gn.bias.double()))
        got = group_norm_cl(to_channels_last_4d(x), 4, gn.weight, gn.bias, gn.eps, relu=True)
    torch.testing.assert_close(from_channels_last_4d(got).double(), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(9, 12), (7, 5), (1, 1), (3, 11)])
def test_packed_levels_round_trip(reranker: CVNetReranker, size) -> None:
    raw = torch.randn(1, 1024, *size)
    with torch.no_grad():
        levels = reranker.prepare(raw)
        packed = reranker.pack(levels)
        assert packed.shape[:2] == (256, size[0])
        assert packed.numel() < raw.numel()                              # 2.3x smaller at real sizes
        for a, b in zip(reranker.levels_of(packed), levels):
            assert torch.equal(a, b)
        for a, b in zip(reranker.levels_of(raw[0]), levels):          # a raw map (older stores)
            assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="channels"):
        reranker.levels_of(torch.zeros(100, 3, 4))


def test_fast_logits_equal_the_published_route_batched(reranker: CVNetReranker) -> None:
    """Batched candidates, tiny and large chunks, gradients off and on: all equal the full 4D
    correlation tensor through the reference conv4d."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        q = reranker.prepare(torch.randn(1, 1024, 9, 11, generator=g))
        k = reranker.prepare(torch.randn(3, 1024, 8, 10, generator=g))
        ref = torch.cat([_published_logits(reranker, q, [lv[i:i + 1] for lv in k]) for i in range(3)])
        for chunk in (1, 64 << 20):
            torch.testing.assert_close(reranker.logits(q, k, chunk_bytes=chunk), ref, atol=2e-5, rtol=0)
        torch.testing.assert_close(reranker.logits(reranker.expand(q), reranker.expand(k)), ref, atol=2e-5, rtol=0)
    with torch.enable_grad():                                          # training route
        torch.testing.assert_close(reranker.logits(q, k).detach(), ref, atol=2e-5, rtol=0)


def _published_logits(rr: CVNetReranker, q, k) -> torch.Tensor:
    x = rr.correlation(q, k)
    for block in (rr.cv_learner.block1, rr.cv_learner.block2, rr.cv_learner.block3, rr.cv_learner.block4):
        for mod in block:
            x = mod.forward_reference(x) if hasattr(mod, "forward_reference") else mod(x)
    return rr.cv_learner.mlp(x.flatten(2).mean(-1))


class _Maps:
    has_maps = True

    def __init__(self, maps) -> None:
        self.maps = maps

    def get_map(self, i: int) -> np.ndarray:
        return self.maps[i]


def test_scorer_on_stored_levels_equals_raw_maps_and_published_loop(reranker: CVNetReranker) -> None:
    rng = np.random.default_rng(4)
    sizes = [(6, 8), (7, 5), (6, 8), (6, 8)]
    raw = [rng.standard_normal((1024, h, w)).astype(np.float32) for h, w in sizes]
    qraw = rng.standard_normal((1024, 5, 7)).astype(np.float32)
    with torch.no_grad():
        packed = [reranker.pack(reranker.prepare(torch.from_numpy(m)[None])).numpy() for m in raw]
        qpacked = reranker.pack(reranker.prepare(torch.from_numpy(qraw)[None])).numpy()
        q_levels = reranker.prepare(torch.from_numpy(qraw)[None])
        naive = np.array([float(torch.softmax(_published_logits(reranker, q_levels,
                                                                reranker.prepare(torch.from_numpy(m)[None])), 1)[0, 1])
                          for m in raw])
    cands = np.array([3, 1, 0, 2])
    from_raw = CVNetScorer(reranker, _Maps(raw)).score(qraw, cands)
    from_levels = CVNetScorer(reranker, _Maps(packed), memory_budget=1 << 30).score(qpacked, cands)
    # float16 as a FeatureStore keeps them by default
    from_levels16 = CVNetScorer(reranker, _Maps([p.astype(np.float16).astype(np.float32) for p in packed]),
                                memory_budget=1).score(qpacked.astype(np.float16).astype(np.float32), cands)
    np.testing.assert_allclose(from_raw, naive[cands], atol=1e-5, rtol=0)
    np.testing.assert_allclose(from_levels, from_raw, atol=1e-6, rtol=0)
    np.testing.assert_allclose(from_levels16, from_raw, atol=1e-4, rtol=0)


def test_extraction_stores_levels_and_reads_old_raw_stores(tmp_path: Path) -> None:
    """A new store keeps packed levels (256 channels); a store begun with raw maps keeps getting raw
    maps when resumed; both re-rank to the same scores."""
    torch.manual_seed(0)
    model = build_model("cvnet-r50")
    rng = np.random.default_rng(5)
    items = []
    for i in range(3):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(p)
        items.append(Item(f"im{i}", str(p)))
    new = extract_to_store(model, items, tmp_path / "new", scales=(1.0,), with_maps=True, progress=False, workers=0)
    assert new.meta["map_channels"] == 256
    # an "old" store: raw 1024-channel maps, as irkit wrote them before
    old = FeatureStore.open_or_create(tmp_path / "old", model=new.meta["model"], config=new.meta["config"],
                                      dim=new.dim)
    with torch.no_grad():
        from irkit.io.images import load_image, to_tensor
        x = torch.stack([to_tensor(load_image(it.path), model.input_spec) for it in items[:2]])
        maps = [m.numpy() for m in model.rerank_map(x)]
    old.add([it.id for it in items[:2]], [it.path for it in items[:2]], new.take([0, 1]), maps=maps)
    old.close()
    old = extract_to_store(model, items, tmp_path / "old", scales=(1.0,), with_maps=True, progress=False, workers=0)
    assert old.meta["map_channels"] == 1024 and old.get_map(2).shape[0] == 1024
    rr = model.reranker
    s_new = CVNetScorer(rr, new).score(new.get_map(0), np.arange(3))
    s_old = CVNetScorer(rr, old).score(old.get_map(0), np.arange(3))
    np.testing.assert_allclose(s_new, s_old, atol=1e-4, rtol=0)
    # adding to the old store through the one SearchEngine (the service's add path) keeps its raw format
    old.close()
    engine = SearchEngine.open(old.root, model=model)
    img = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    desc, fmap = engine.embed_with_map(img)
    engine.add(["added"], [str(tmp_path / "added.png")], desc[None], maps=[fmap])
    assert fmap.shape[0] == 1024 and engine.store.get_map(engine.row_of("added")).shape[0] == 1024
    hits = engine.search(id="im0", k=4, rerank="cvnet")
    assert hits[0]["id"] == "im0" and {h["stage"] for h in hits} == {"cvnet"}

"""CVNet module: correlation properties, the fast scoring route, strict loading of the published
checkpoint layout (R50 and R101 key lists) and the official <-> irkit key map."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from irkit.errors import CheckpointError
from irkit.models.cvnet import CVNet, CVNetReranker, branch_size, irkit_to_official, official_to_irkit
from irkit.models.checkpoints import load_strict
from irkit.models.registry import build_model, get_preset, list_presets

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


pytestmark = pytest.mark.usefixtures("single_thread")


def _keys(depth: int) -> list[tuple[str, tuple[int, ...], str]]:
    path = REFERENCE / f"cvnet_r{depth}_state_dict_keys.txt"
    if not path.is_file():
        pytest.skip(f"official key list {path} absent (it lives in ../shared)")
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            key, shape, dtype = line.split("\t")
            out.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype))
    return out


def _official_checkpoint(depth: int) -> dict[str, torch.Tensor]:
    """A checkpoint in the published layout, built from the key list (small random values)."""
    g = torch.Generator().manual_seed(depth)
    return {k: (torch.zeros(s, dtype=torch.int64) if d == "torch.int64" else torch.rand(s, generator=g))
            for k, s, d in _keys(depth)}


def _save(state: dict, path: Path) -> Path:
    torch.save({"model_state": state}, path)
    return path


@pytest.fixture(scope="module")
def reranker() -> CVNetReranker:
    torch.manual_seed(0)
    return CVNetReranker().eval()


def _levels(rr: CVNetReranker, h: int, w: int, seed: int, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return rr.prepare(torch.randn(batch, 1024, h, w, generator=g))


def test_branch_sizes_round_half_to_even() -> None:
    assert branch_size(13, 17, 0.25) == (6, 8)        # 6.5 -> 6, 8.5 -> 8
    assert branch_size(14, 18, 0.5) == (10, 13)
    assert branch_size(15, 15, 1.0) == (15, 15)
    assert branch_size(1, 1, 0.25) == (1, 1)          # never empty


def test_correlation_properties(reranker: CVNetReranker) -> None:
    q, k = _levels(reranker, 7, 9, 1), _levels(reranker, 6, 5, 2, batch=2)
    with torch.no_grad():
        c = reranker.correlation(q, k)
        c_swapped = reranker.correlation([lv[:1] for lv in k], q)
    assert c.shape == (2, 9, 7, 9, 6, 5)
    assert float(c.min()) >= 0.0 and float(c.max()) <= 1.0 + 1e-6
    # swapping query and key transposes the 4D map and the (query level, key level) channel pair
    t = c_swapped.view(1, 3, 3, 6, 5, 7, 9).permute(0, 2, 1, 5, 6, 3, 4).reshape(1, 9, 7, 9, 6, 5)
    torch.testing.assert_close(c[:1], t, rtol=0, atol=1e-5)
    # an image against itself: same-level channels are 1 on the diagonal
    with torch.no_grad():
        self_c = reranker.correlation(q, q)
    diag = self_c[0, 8].reshape(63, 63).diagonal()
    torch.testing.assert_close(diag, torch.ones(63), rtol=0, atol=1e-5)


def test_fast_route_equals_published_route(reranker: CVNetReranker) -> None:
    q, k = _levels(reranker, 9, 11, 3), _levels(reranker, 8, 7, 4, batch=3)
    with torch.no_grad():
        ref = reranker.forward_reference(q, k)
        fast = reranker.logits(q, k)
        tiny_chunks = reranker.logits(q, k, chunk_bytes=1)       # one pivot position at a time
        one_by_one = torch.cat([reranker.logits(q, [lv[i:i + 1] for lv in k]) for i in range(3)])
    for got in (fast, tiny_chunks, one_by_one):
        torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)
    p = torch.softmax(ref, dim=1)[:, 1]
    with torch.no_grad():
        torch.testing.assert_close(reranker.score(q, k), p, rtol=0, atol=1e-5)


def test_module_keys_match_official_layout_both_ways() -> None:
    for depth in (50, 101):
        official = {k: s for k, s, _ in _keys(depth)}
        own = {k: tuple(v.shape) for k, v in CVNet(depth).state_dict().items()}
        converted = official_to_irkit({k: torch.empty(0) for k in official})
        assert set(converted) == set(own)
        assert {k: official[o] for k, o in zip(converted, official)} == own       # shapes agree key by key
        back = irkit_to_official({k: torch.empty(0) for k in own})
        assert set(back) == set(official)
        assert list(irkit_to_official(official_to_irkit(dict.fromkeys(official, 0)))) == list(official)
    assert official_to_irkit({"encoder_q.head.pool.p": 1})["pool.p"] == 1
    assert official_to_irkit({"encoder_q.s3.b6.f.c_bn.bias": 1}) == {"backbone.layer3.5.bn3.bias": 1}
    assert official_to_irkit({"cv_learner.block2.3.conv1.weight": 1}) == {
        "reranker.cv_learner.block2.3.conv1.weight": 1}
    assert official_to_irkit({"encoder_q.extra.w": 1}) == {"encoder_q.extra.w": 1}   # unknown keeps its name


def test_presets_registered() -> None:
    assert {"cvnet-r50", "cvnet-r101"} <= set(list_presets())
    m = get_preset("cvnet-r50").build()
    assert m.dim == 2048 and m.input_spec.channel_order == "BGR"
    assert m.input_spec.mean == (0.406, 0.456, 0.485) and m.input_spec.std == (0.225, 0.224, 0.229)
    assert m.input_spec.max_side is None and m.default_scales == (0.7071, 1.0, 1.4142)
    assert m.has_rerank_map and m.pool.p.shape == (1,) and float(m.pool.p.detach()) == 3.0
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        d, fmap = m.eval().embed_and_map(x)
        torch.testing.assert_close(d, m(x))
        torch.testing.assert_close(fmap, m.rerank_map(x))
    assert d.shape == (1, 2048) and fmap.shape == (1, 1024, 4, 5)
    torch.testing.assert_close(d.norm(dim=1), torch.ones(1))


@pytest.fixture(scope="module")
def official_states() -> dict[int, dict[str, torch.Tensor]]:
    return {depth: _official_checkpoint(depth) for depth in (50, 101)}


@pytest.mark.parametrize("depth", [50, 101])
def test_official_layout_loads_strictly(depth: int, official_states, tmp_path: Path) -> None:
    state = official_states[depth]
    m = build_model(f"cvnet-r{depth}", weights=_save(state, tmp_path / "ok.pyth"))
    assert m.load_report.complete and len(m.load_report.loaded) == len(state)
    own = m.state_dict()
    assert torch.equal(own["backbone.layer3.0.downsample.0.weight"], state["encoder_q.s3.b1.proj.weight"])
    assert torch.equal(own["reranker.cv_learner.mlp.2.bias"], state["cv_learner.mlp.2.bias"])
    assert torch.equal(own["pool.p"], state["encoder_q.head.pool.p"])
    # the inverse map gives back the published checkpoint, key for key and tensor for tensor
    back = irkit_to_official(own)
    assert list(back) != [] and set(back) == set(state)
    assert all(torch.equal(back[k], v) for k, v in state.items())
    # refusals, through the preset's converter and the same strict loader build_model uses
    convert = get_preset(f"cvnet-r{depth}").convert
    missing = dict(state)
    del missing["cv_learner.block3.4.weight"]
    with pytest.raises(CheckpointError, match=r"missing: reranker\.cv_learner\.block3\.4\.weight"):
        load_strict(m, convert(missing), source="missing.pyth")
    extra = dict(state, **{"encoder_q.head.whiten.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected: encoder_q\.head\.whiten\.weight"):
        load_strict(m, convert(extra), source="extra.pyth")
    bad = dict(state, **{"conv2ds.1.weight": torch.zeros(128, 1024, 3, 3)})
    with pytest.raises(CheckpointError, match=r"mis-shaped: reranker\.conv2ds\.1\.weight"):
        load_strict(m, convert(bad), source="bad.pyth")
    other = official_states[151 - depth]          # the other depth's checkpoint
    with pytest.raises(CheckpointError, match="unexpected" if depth == 50 else "missing"):
        load_strict(m, convert(other), source="other_depth.pyth")


def test_strict_load_refuses_through_build_model(official_states, tmp_path: Path) -> None:
    state = dict(official_states[50])
    del state["encoder_q.s2.b3.f.b_bn.running_var"]
    with pytest.raises(CheckpointError,
                       match=r"missing\.pyth does not match.*missing: encoder_q\.s2\.b3\.f\.b_bn\.running_var"):
        build_model("cvnet-r50", weights=_save(state, tmp_path / "missing.pyth"))


def test_allow_partial_loads_what_fits(official_states, tmp_path: Path) -> None:
    state = dict(official_states[50])
    del state["encoder_q.head.fc.bias"]
    state["conv2ds.0.weight"] = torch.zeros(8, 1024, 3, 3)
    state["encoder_q.unused"] = torch.zeros(1)
    m = build_model("cvnet-r50", weights=_save(state, tmp_path / "partial.pyth"), allow_partial=True)
    rep = m.load_report
    # keys are named as the published checkpoint spells them
    assert rep.missing == ["encoder_q.head.fc.bias"] and rep.unexpected == ["encoder_q.unused"]
    assert len(rep.mismatched) == 1 and rep.mismatched[0].startswith("conv2ds.0.weight")
    assert torch.equal(m.state_dict()["fc.weight"], state["encoder_q.head.fc.weight"])
    assert m.state_dict()["reranker.conv2ds.0.weight"].shape == (256, 1024, 3, 3)   # left at its init


def test_verify_and_explain_commands(tmp_path: Path, capsys) -> None:
    import json

    import numpy as np
    from PIL import Image

    from irkit.cli import main

    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(96, 128), (112, 80)]):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    assert main(["verify", *paths, "--model", "cvnet-r50", "--scales", "1", "--lambda", "0.25", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out) == {"global", "rerank", "score"} and 0.0 <= out["rerank"] <= 1.0
    assert out["score"] == pytest.approx(out["global"] + 0.25 * out["rerank"])
    png = tmp_path / "why.png"
    assert main(["explain", *paths, "--model", "cvnet-r50", "--scales", "1", "-o", str(png), "--top", "5",
                 "--height", "64"]) == 0
    pic = np.asarray(Image.open(png))
    assert pic.dtype == np.uint8 and pic.shape[0] == 64 + 30 and pic.shape[2] == 3
    assert pic.shape[1] == round(128 * 64 / 96) + 8 + round(80 * 64 / 112)
    assert main(["verify", paths[0], str(tmp_path / "missing.jpg")]) == 1
    assert "missing.jpg" in capsys.readouterr().err

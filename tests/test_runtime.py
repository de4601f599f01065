"""The runtime choice (irkit.export.forward_runner, used by every extraction and query embedding):
onnxruntime descriptors equal torch fp32 within 1e-4 cosine, exports are cached per weights, a
failed first-use check falls back to torch (auto) or refuses (explicit onnx)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import irkit.export as export
from irkit.cli import main
from irkit.export import ExportError, OnnxModel, forward_runner, runtime_of, set_runtime
from irkit.extract import embed_arrays
from irkit.models.registry import Preset, list_presets, register_preset
from irkit.nn.pooling import GeM

from tiny_model import TinyNet

NAME = "test-tiny-runtime"


class _Net(TinyNet):
    """The tests' tiny network with a GeM *module* (the exporter rewrites it), so it exports to onnx."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = GeM()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.pool(self.body(x)), dim=-1)


if NAME not in list_presets():
    register_preset(Preset(name=NAME, build=_Net, description="runtime test network"))


def _tiny() -> _Net:
    torch.manual_seed(0)
    model = _Net().eval()
    model.preset_name, model.weights_id = NAME, "random"
    return model

pytest.importorskip("onnxruntime")


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8) for i in range(n)]


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("IRKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("IRKIT_RUNTIME", raising=False)
    return tmp_path / "cache"


def test_onnx_runtime_matches_torch_and_caches_the_export(cache: Path) -> None:
    model = _tiny()
    imgs = _images(3)
    ref = embed_arrays(set_runtime(model, "torch"), imgs)
    got = embed_arrays(set_runtime(model, "onnx"), imgs)
    assert isinstance(forward_runner(model), export._CheckedOnnx)
    assert np.min(np.sum(ref * got, axis=1)) >= 1 - 1e-4
    files = list((cache / "onnx").glob("*.onnx"))
    assert len(files) == 1 and files[0].name.startswith(NAME)
    mtime = files[0].stat().st_mtime_ns
    twin = _tiny()
    twin.load_state_dict(model.state_dict())
    embed_arrays(set_runtime(twin, "onnx"), imgs[:1])                 # same weights: same file, no export
    assert [f.stat().st_mtime_ns for f in (cache / "onnx").glob("*.onnx")] == [mtime]
    other = _tiny()                                                   # other (random) weights: another file
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    embed_arrays(set_runtime(other, "onnx"), imgs[:1])
    assert len(list((cache / "onnx").glob("*.onnx"))) == 2


def test_onnx_session_follows_weight_changes(cache: Path) -> None:
    """A model whose weights change after its first onnx use (training, load_state_dict) is
    exported again: the session never serves the old weights."""
    model = set_runtime(_tiny(), "onnx")
    imgs = _images(2)
    before = embed_arrays(model, imgs)
    other = _tiny()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1.5)
    model.load_state_dict(other.state_dict())                         # in place: same module object
    after = embed_arrays(model, imgs)
    ref = embed_arrays(set_runtime(other, "torch"), imgs)
    assert np.max(np.abs(after - before)) > 1e-2
    assert np.min(np.sum(ref * after, axis=1)) >= 1 - 1e-4
    opt = torch.optim.SGD(model.parameters(), lr=0.5)                 # an optimiser step, as in training
    model.train()
    (model(torch.rand(2, 3, 32, 32)) ** 2).sum().backward()
    opt.step()
    model.eval()
    stepped = embed_arrays(model, imgs)
    assert np.min(np.sum(embed_arrays(set_runtime(_copy(model), "torch"), imgs) * stepped, axis=1)) >= 1 - 1e-4
    assert len(list((cache / "onnx").glob("*.onnx"))) == 3


def _copy(model: _Net) -> _Net:
    twin = _tiny()
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def test_training_evaluates_in_torch() -> None:
    """Recipes evaluate the model they train in torch (no export per evaluation)."""
    from irkit.train.recipe_base import Recipe

    model = _tiny()
    assert export.requested_runtime(Recipe(model, None, 2).model) == "torch"


def test_auto_uses_onnx_only_for_the_families_measured_faster(monkeypatch) -> None:
    model = _tiny()
    assert runtime_of(model) == "torch" and forward_runner(model) is model
    monkeypatch.setattr(export, "ONNX_FASTER_FAMILIES", (NAME,))
    assert runtime_of(model) == "onnx"
    monkeypatch.setenv("IRKIT_RUNTIME", "torch")
    assert runtime_of(model) == "torch"
    assert runtime_of(set_runtime(model, "onnx")) == "onnx"          # explicit choice beats the environment


def test_failed_first_use_check_falls_back_or_refuses(monkeypatch, caplog) -> None:
    monkeypatch.setattr(export, "ONNX_FASTER_FAMILIES", (NAME,))
    model = _tiny()
    imgs = _images(2)
    ref = embed_arrays(set_runtime(model, "torch"), imgs)
    embed_arrays(set_runtime(model, "onnx"), imgs)                   # exported and cached while sound
    monkeypatch.setattr(OnnxModel, "forward", lambda self, x: torch.nn.functional.normalize(
        torch.randn(x.shape[0], self.dim), dim=-1))                   # then the runtime breaks
    with caplog.at_level(logging.WARNING, logger="irkit.export"):
        got = embed_arrays(set_runtime(model, "auto"), imgs)
    assert "running torch instead" in caplog.text
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert forward_runner(model).fallback
    with pytest.raises(ExportError, match="differ from torch"):
        embed_arrays(set_runtime(model, "onnx"), imgs)
    other = _tiny()                                                   # an export that fails its own check
    with torch.no_grad():
        next(other.parameters()).add_(0.5)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="irkit.export"):
        np.testing.assert_allclose(embed_arrays(set_runtime(other, "auto"), imgs),
                                   embed_arrays(set_runtime(other, "torch"), imgs), atol=1e-6)
    assert "running torch" in caplog.text


def test_embed_command_takes_runtime(tmp_path: Path, cache: Path) -> None:
    from PIL import Image

    path = tmp_path / "a.png"
    Image.fromarray(_images(1)[0]).save(path)
    for runtime in ("torch", "onnx"):
        out = tmp_path / f"{runtime}.npy"
        assert main(["embed", str(path), "-o", str(out), "--model", NAME, "--runtime", runtime]) == 0
        assert np.load(out).shape == (1, 16)
    assert len(list((cache / "onnx").glob("*.onnx"))) == 1

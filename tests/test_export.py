"""ONNX export (irkit.export): onnxruntime descriptors equal torch's; OnnxModel works in extraction."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from irkit.export import OnnxModel, export_onnx  # noqa: E402
from irkit.extract import Item, embed_arrays, extract_to_store  # noqa: E402

SIZES = ((96, 128), (150, 97))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from irkit.models.effnet import EffNetGeM

    torch.manual_seed(0)
    model = EffNetGeM("lite0", max_side=96).eval()
    model.preset_name, model.weights_id = "effnetlite0-gem", "random-seed0"
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "lite0.onnx", check=False)
    return model, path


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("size", SIZES)
def test_onnx_matches_torch(exported, size):
    model, path = exported
    onnx_model = OnnxModel(path)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = model(x).numpy()
    got = onnx_model(x).numpy()
    assert got.shape == (2, model.dim)
    assert _cos(ref, got).min() >= 1 - 1e-4


def test_onnx_model_carries_conventions(exported):
    model, path = exported
    om = OnnxModel(path)
    assert (om.input_spec, om.default_scales, om.scale_reduce, om.dim, om.preset_name) == \
        (model.input_spec, model.default_scales, model.scale_reduce, model.dim, model.preset_name)
    assert om.describe()["runtime"] == "onnxruntime"  # its stores never mix with torch's


def test_onnx_model_in_extraction(exported, tmp_path):
    from PIL import Image

    model, path = exported
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in [(80, 120), (120, 80), (64, 64)]]
    om = OnnxModel(path)
    ref = embed_arrays(model, images, scales=(0.7071, 1.0))
    got = embed_arrays(om, images, scales=(0.7071, 1.0))
    assert _cos(ref, got).min() >= 1 - 1e-4
    items = []
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        items.append(Item(str(i), str(tmp_path / f"{i}.png")))
    store = extract_to_store(om, items, tmp_path / "store", scales=(0.7071, 1.0), dtype="float32",
                             progress=False, optimize=False, workers=0)
    assert store.ids == ["0", "1", "2"]
    assert _cos(np.asarray(store.descriptors()), got).min() >= 1 - 1e-6

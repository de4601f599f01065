"""ResNet + GeM global descriptors (Radenović et al., "cirtorch" style).

Presets:

* ``gem-r101``: ResNet-101 -> GeM (trainable p, init 3) -> learned whitening ``Linear(2048, 2048)``
  with bias -> L2. RGB input, ImageNet mean/std, larger side 1024, scales (0.7071, 1, 1.4142)
  averaged. cirtorch's conventions as best known (unverified: cirtorch combines scales by a
  generalised mean with the pooling p; irkit uses the mean of the L2-normalised descriptors).
* ``resnet50-gem``: ResNet-50 -> GeM (p=3 fixed) -> L2 (no whitening), 2048-D; the model of the
  extraction benchmark (random weights, or torchvision ImageNet weights given by path).

Checkpoints accepted (mapped by :func:`backbone_to_irkit`): irkit's own layout; a bare backbone in
torchvision naming (``conv1.*``, ``layer1.0.*``; the ImageNet ``fc.*`` is dropped with a log line);
pycls naming (``stem.*``, ``s1.b1.*``); cirtorch's ``features.N.*`` (children of torchvision's
ResNet: 0 conv1, 1 bn1, 4-7 layer1-4; unverified) with ``pool.p`` and ``whiten.*``. A checkpoint
that has only the backbone gets the head's initial values (p = 3, identity whitening), logged.
"""
from __future__ import annotations

import logging
import re
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from irkit.io.images import InputSpec
from irkit.models.base import GlobalModel
from irkit.models.registry import Preset, register_preset
from irkit.nn.backbones.resnet import ResNet, is_pycls_layout, pycls_key_to_torchvision
from irkit.nn.pooling import GeM

log = logging.getLogger(__name__)

IMAGENET_RGB = InputSpec(channel_order="RGB", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                         max_side=1024)
_CIRTORCH_FEATURES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
_CIRTORCH_KEY = re.compile(r"^features\.(\d+)\.(.+)$")
_TV_BACKBONE = re.compile(r"^(conv1|bn1|layer[1-4])\.")


def backbone_to_irkit(state: Mapping[str, Tensor], prefix: str = "backbone.") -> dict[str, Tensor]:
    """Map a ResNet state dict in torchvision, pycls or cirtorch naming onto ``prefix`` + torchvision
    keys. Keys that fit no rule keep their name (a strict load then reports them as unexpected);
    ``fc.*`` of a bare torchvision classifier is dropped (logged)."""
    out: dict[str, Tensor] = {}
    pycls = is_pycls_layout(state)
    dropped = []
    for key, value in state.items():
        m = _CIRTORCH_KEY.match(key)
        if m and m.group(1) in _CIRTORCH_FEATURES:
            out[prefix + _CIRTORCH_FEATURES[m.group(1)] + "." + m.group(2)] = value
        elif pycls and (key.startswith("stem.") or re.match(r"^s\d\.b\d+\.", key)):
            out[prefix + pycls_key_to_torchvision(key)] = value
        elif _TV_BACKBONE.match(key):
            out[prefix + key] = value
        elif key.startswith("fc.") and not any(k.startswith(("whiten.", "pool.")) for k in state):
            dropped.append(key)
        else:
            out[key] = value
    if dropped:
        log.info("ImageNet classifier dropped from the checkpoint: %s", ", ".join(sorted(dropped)))
    return out


class ResNetGeM(GlobalModel):
    """ResNet -> GeM -> (optional learned whitening Linear) -> L2."""

    default_scales = (0.7071, 1.0, 1.4142)
    scale_reduce = "mean"

    def __init__(self, depth: int = 101, whitening: bool = True, learn_p: bool = True, p: float = 3.0,
                 max_side: int | None = 1024) -> None:
        super().__init__()
        self.depth = depth
        self.input_spec = InputSpec("RGB", IMAGENET_RGB.mean, IMAGENET_RGB.std, max_side=max_side)
        self.backbone = ResNet(depth)
        self.pool = GeM(p=p, learn_p=learn_p)
        self.dim = ResNet.out_channels
        self.whiten = nn.Linear(self.dim, self.dim, bias=True) if whitening else None
        if self.whiten is not None:
            with torch.no_grad():  # identity until trained or loaded
                self.whiten.weight.copy_(torch.eye(self.dim))
                self.whiten.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        v = self.pool(self.backbone(x))
        if self.whiten is not None:
            v = self.whiten(F.normalize(v, dim=-1))
        return F.normalize(v, dim=-1)

    def describe(self) -> dict:
        out = super().describe()
        out.update(depth=self.depth, whitening=self.whiten is not None)
        return out


def _head_defaults(whitening: bool, learn_p: bool, dim: int = ResNet.out_channels) -> dict[str, Tensor]:
    """Initial values of the head's persistent tensors (filled in for backbone-only checkpoints)."""
    out: dict[str, Tensor] = {}
    if learn_p:
        out["pool.p"] = torch.full((1,), 3.0)
    if whitening:
        out["whiten.weight"] = torch.eye(dim)
        out["whiten.bias"] = torch.zeros(dim)
    return out


def _convert_for(whitening: bool, learn_p: bool) -> Callable[[Mapping[str, Tensor]], dict[str, Tensor]]:
    def convert(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = backbone_to_irkit(state)
        head = _head_defaults(whitening, learn_p)
        if head and not any(k in out for k in head):
            out.update(head)
            log.warning("checkpoint has only the backbone: head initialised (%s; GeM p=3, identity "
                        "whitening)", ", ".join(head))
        return out
    return convert


def _gem_r101(**options) -> ResNetGeM:
    return ResNetGeM(depth=options.pop("depth", 101), **options)


def _resnet50_gem(**options) -> ResNetGeM:
    options.setdefault("whitening", False)
    options.setdefault("learn_p", False)
    return ResNetGeM(depth=50, **options)


register_preset(Preset(
    name="gem-r101",
    build=_gem_r101,
    description=("ResNet-101 + GeM (trainable p) + learned whitening 2048->2048 (cirtorch style), RGB "
                 "ImageNet mean/std, larger side 1024, scales 0.7071/1/1.4142; loads torchvision-, "
                 "pycls- or cirtorch-named weights"),
    convert=_convert_for(whitening=True, learn_p=True),
))
register_preset(Preset(
    name="resnet50-gem",
    build=_resnet50_gem,
    description=("ResNet-50 + GeM (p=3) + L2, 2048-D, RGB ImageNet mean/std, larger side 1024 "
                 "(extraction benchmark model; random or torchvision ImageNet weights by path)"),
    convert=_convert_for(whitening=False, learn_p=False),
))

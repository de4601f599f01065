"""CFCD (Zhu et al., ICCV 2023): a single-stage compact (512-D) global descriptor.

ResNet-50/101 (pycls weights) -> GeM (p = 3, fixed) -> Linear 2048->512 -> BatchNorm1d(512) -> L2.
BGR input with CVNet's mean/std; test scales 0.3535, 0.5, 0.7071, 1, 1.4142 at native resolution.

Published checkpoint (``model_state``) -> irkit keys:

=============================  ==========================
``globalmodel.<pycls key>``    ``backbone.<torchvision>``
``fc.*``, ``bn.*``             ``fc.*``, ``bn.*``
``desc_cls.weight`` (81313x512)  dropped (training-only classifier; logged)
=============================  ==========================

Keys that fit no rule keep their published name, so a strict load names them.
"""
from __future__ import annotations

import logging
import re
from typing import Callable, Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from irkit.io.images import InputSpec
from irkit.models.base import GlobalModel
from irkit.models.registry import Preset, register_preset
from irkit.nn.backbones.resnet import ResNet, pycls_key_to_torchvision, torchvision_key_to_pycls
from irkit.nn.pooling import GeM

log = logging.getLogger(__name__)

__all__ = ["CFCD", "CFCD_INPUT_SPEC", "CFCD_SCALES", "convert", "irkit_to_official"]

CFCD_INPUT_SPEC = InputSpec(channel_order="BGR", mean=(0.406, 0.456, 0.485), std=(0.225, 0.224, 0.229),
                            max_side=None, interp_down="area", interp_up="linear")
CFCD_SCALES = (0.3535, 0.5, 0.7071, 1.0, 1.4142)
TRAINING_ONLY_KEYS = ("desc_cls.weight",)
_PYCLS_KEY = re.compile(r"^(stem\.|s\d\.b\d+\.)")
_TV_KEY = re.compile(r"^(conv1|bn1|layer[1-4])\.")


class CFCD(GlobalModel):
    """ResNet -> GeM(p=3 fixed) -> Linear(2048, dim) -> BatchNorm1d(dim) -> L2."""

    input_spec = CFCD_INPUT_SPEC
    default_scales = CFCD_SCALES
    scale_reduce = "mean"

    def __init__(self, depth: int = 50, dim: int = 512) -> None:
        super().__init__()
        self.depth = depth
        self.dim = dim
        self.backbone = ResNet(depth)
        self.pool = GeM(p=3.0, eps=1e-6, learn_p=False)
        self.fc = nn.Linear(ResNet.out_channels, dim, bias=True)
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.bn(self.fc(self.pool(self.backbone(x)))), p=2, dim=1)

    def describe(self) -> dict:
        out = super().describe()
        out.update(depth=self.depth)
        return out


def convert(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Published CFCD ``model_state`` -> irkit :class:`CFCD` keys; drops ``desc_cls.weight``."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in TRAINING_ONLY_KEYS:
            log.info("CFCD checkpoint: %s %s dropped (training-only classifier, unused for inference)",
                     key, tuple(value.shape))
            continue
        rest = key[len("globalmodel."):] if key.startswith("globalmodel.") else None
        if rest is not None and _PYCLS_KEY.match(rest):
            out["backbone." + pycls_key_to_torchvision(rest)] = value
        else:
            out[key] = value
    return out


def irkit_to_official(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`convert` (without ``desc_cls``): write the published layout."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        rest = key[len("backbone."):] if key.startswith("backbone.") else None
        if rest is not None and _TV_KEY.match(rest):
            out["globalmodel." + torchvision_key_to_pycls(rest)] = value
        else:
            out[key] = value
    return out


def _build(depth: int) -> Callable[..., CFCD]:
    def build(dim: int = 512) -> CFCD:
        return CFCD(depth=depth, dim=dim)
    return build


for _depth in (50, 101):
    register_preset(Preset(
        name=f"cfcd-r{_depth}",
        build=_build(_depth),
        description=(f"CFCD ResNet-{_depth}: GeM(p=3) -> FC 512 -> BN -> L2 (512-D, BGR input, scales "
                     "0.3535/0.5/0.7071/1/1.4142); loads the published checkpoint (model_state with "
                     "globalmodel.*, fc.*, bn.*; desc_cls.weight dropped)"),
        convert=convert,
    ))

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
from functools import lru_cache, partial
from typing import Callable, Mapping

import torch
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


@lru_cache(maxsize=4)
def _irkit_keys(depth: int) -> frozenset[str]:
    with torch.device("meta"):  # key names only, no memory, no init cost
        return frozenset(CFCD(depth).state_dict())


def _infer_depth(state: Mapping[str, Tensor]) -> int | None:
    stage3 = {int(m.group(1)) for k in state if (m := re.match(r"^globalmodel\.s3\.b(\d+)\.", k))}
    return {6: 50, 23: 101}.get(max(stage3, default=0))


def convert(state: Mapping[str, Tensor], depth: int | None = None) -> dict[str, Tensor]:
    """Published CFCD ``model_state`` -> irkit :class:`CFCD` keys; drops ``desc_cls.weight``.

    A published key whose irkit name the model does not have keeps its published name (so a strict
    load reports it as the user sees it); published keys absent from the checkpoint are logged under
    their published names (the strict load then reports their irkit names). ``depth`` defaults to
    the one the stage-3 block count implies."""
    depth = depth or _infer_depth(state)
    known = _irkit_keys(depth) if depth in (50, 101) else None
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in TRAINING_ONLY_KEYS:
            log.info("CFCD checkpoint: %s %s dropped (training-only classifier, unused for inference)",
                     key, tuple(value.shape))
            continue
        new = key
        rest = key[len("globalmodel."):] if key.startswith("globalmodel.") else None
        if rest is not None and _PYCLS_KEY.match(rest):
            new = "backbone." + pycls_key_to_torchvision(rest)
            if known is not None and new not in known:
                new = key
        out[new] = value
    if known is not None:
        missing = sorted(irkit_to_official({k: None for k in known if k not in out}))  # type: ignore[misc]
        if missing:
            log.warning("CFCD checkpoint lacks %d published key(s): %s%s", len(missing), ", ".join(missing[:8]),
                        " ..." if len(missing) > 8 else "")
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
        convert=partial(convert, depth=_depth),
        unconvert=irkit_to_official,
    ))

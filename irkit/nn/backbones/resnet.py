"""ResNet-50/101 (torchvision v1.5 layout: stride on the 3x3 conv), with state-dict keys that match
torchvision's, a lossless key map to and from pycls naming (used by CVNet and CFCD checkpoints), and
access to the stage-3 map before its last ReLU (CVNet's re-ranking input) and the stage-4 map."""
from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor, nn

from irkit.errors import ConfigError

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, bn_eps: float = 1e-5) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=bn_eps)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width, eps=bn_eps)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=bn_eps)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_ch, eps=bn_eps))

    def forward_preact(self, x: Tensor) -> Tensor:
        """Residual sum before the final ReLU."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.forward_preact(x))


class ResNet(nn.Module):
    """Bottleneck ResNet without classifier (``num_classes`` adds torchvision's ``fc``)."""

    out_channels = 2048
    stage3_channels = 1024

    def __init__(self, depth: int = 50, bn_eps: float = 1e-5, num_classes: int | None = None) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ConfigError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=bn_eps)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = 64
        for i, (blocks, width) in enumerate(zip(DEPTHS[depth], (64, 128, 256, 512)), start=1):
            layers = []
            for j in range(blocks):
                layers.append(Bottleneck(in_ch, width, stride=(2 if j == 0 and i > 1 else 1), bn_eps=bn_eps))
                in_ch = width * Bottleneck.expansion
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.fc = nn.Linear(2048, num_classes) if num_classes else None

    def stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def stage3_preact(self, x: Tensor) -> Tensor:
        """Stage-3 output of the last block before its final ReLU (1024 ch, stride 16)."""
        x = self.layer2(self.layer1(self.stem(x)))
        *blocks, last = self.layer3
        for block in blocks:
            x = block(x)
        return last.forward_preact(x)

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(stage-3 map before the last ReLU, stage-4 map) from one pass."""
        pre = self.stage3_preact(x)
        return pre, self.layer4(torch.relu(pre))

    def forward(self, x: Tensor) -> Tensor:
        """Stage-4 map [B, 2048, H/32, W/32]."""
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


# --- key maps: torchvision <-> pycls ------------------------------------------------------------
_TV_LEAF_TO_PYCLS = {"conv1": "a", "bn1": "a_bn", "conv2": "b", "bn2": "b_bn", "conv3": "c", "bn3": "c_bn"}
_PYCLS_LEAF_TO_TV = {v: k for k, v in _TV_LEAF_TO_PYCLS.items()}
_TV_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.(conv[123]|bn[123])\.(.+)$")
_TV_DOWN = re.compile(r"^layer(\d)\.(\d+)\.downsample\.([01])\.(.+)$")
_PY_BLOCK = re.compile(r"^s(\d)\.b(\d+)\.f\.(a|a_bn|b|b_bn|c|c_bn)\.(.+)$")
_PY_PROJ = re.compile(r"^s(\d)\.b(\d+)\.(proj|bn)\.(.+)$")


def torchvision_key_to_pycls(key: str) -> str:
    """``layer3.0.conv1.weight`` -> ``s3.b1.f.a.weight`` (and stem, shortcut); unknown keys unchanged."""
    if key.startswith("conv1."):
        return "stem.conv." + key[len("conv1."):]
    if key.startswith("bn1."):
        return "stem.bn." + key[len("bn1."):]
    m = _TV_BLOCK.match(key)
    if m:
        stage, block, leaf, rest = m.groups()
        return f"s{stage}.b{int(block) + 1}.f.{_TV_LEAF_TO_PYCLS[leaf]}.{rest}"
    m = _TV_DOWN.match(key)
    if m:
        stage, block, idx, rest = m.groups()
        return f"s{stage}.b{int(block) + 1}.{'proj' if idx == '0' else 'bn'}.{rest}"
    return key


def pycls_key_to_torchvision(key: str) -> str:
    """Inverse of :func:`torchvision_key_to_pycls`."""
    if key.startswith("stem.conv."):
        return "conv1." + key[len("stem.conv."):]
    if key.startswith("stem.bn."):
        return "bn1." + key[len("stem.bn."):]
    m = _PY_BLOCK.match(key)
    if m:
        stage, block, leaf, rest = m.groups()
        return f"layer{stage}.{int(block) - 1}.{_PYCLS_LEAF_TO_TV[leaf]}.{rest}"
    m = _PY_PROJ.match(key)
    if m:
        stage, block, kind, rest = m.groups()
        return f"layer{stage}.{int(block) - 1}.downsample.{'0' if kind == 'proj' else '1'}.{rest}"
    return key


def torchvision_to_pycls(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {torchvision_key_to_pycls(k): v for k, v in state.items()}


def is_pycls_layout(state: Mapping[str, Tensor]) -> bool:
    return any(k.startswith("stem.") or _PY_BLOCK.match(k) for k in state)

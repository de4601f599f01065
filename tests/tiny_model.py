"""A tiny registered preset for tests that need a real model but not a real network."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from irkit.io.images import InputSpec
from irkit.models.base import GlobalModel
from irkit.models.registry import Preset, register_preset
from irkit.nn.pooling import gem

NAME = "test-tiny-extract"


class TinyNet(GlobalModel):
    """conv-BN-ReLU x2 -> GeM -> L2; small enough for unit tests, with BatchNorm to fold."""

    input_spec = InputSpec()
    default_scales = (0.5, 1.0)
    dim = 16

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(gem(self.body(x)), dim=-1)


def _tiny() -> TinyNet:
    torch.manual_seed(0)
    net = TinyNet()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so folding is really exercised
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    net.preset_name = NAME
    return net.eval()


register_preset(Preset(NAME, lambda: _tiny(), "test-only tiny network"))


"""Global pooling of a conv map [B, C, H, W] into [B, C]: functional and module forms."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gem(x: Tensor, p: Tensor | float = 3.0, eps: float = 1e-6) -> Tensor:
    """Generalised mean: (mean over positions of clamp(x, eps)^p)^(1/p). p=1 is SPoC, p->inf is MAC."""
    if isinstance(p, Tensor):
        p = p.reshape(-1)[0] if p.numel() == 1 else p.view(1, -1, 1, 1)
    pooled = F.avg_pool2d(x.clamp(min=eps).pow(p), (x.size(-2), x.size(-1)))
    return pooled.pow(1.0 / p).flatten(1)


class GeM(nn.Module):
    """GeM pooling; ``p`` is a parameter of shape [1] (trainable unless ``learn_p=False``)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learn_p: bool = True) -> None:
        super().__init__()
        self.eps = eps
        if learn_p:
            self.p = nn.Parameter(torch.ones(1) * p)
        else:
            self.register_buffer("p", torch.ones(1) * p, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return gem(x, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"p={float(self.p.detach()[0]):.4f}, eps={self.eps}"

"""Hide-and-Seek on feature maps (Singh & Lee 2017, used by CVNet's re-ranker training).

The map [B,C,h,w] is split into a grid of cells and each cell is hidden independently with
probability ``p``. Hiding the most discriminative parts forces the re-ranker to use all the
evidence an image holds instead of one salient patch, which helps under occlusion and partial
overlap. Only in training: at test time the map passes through unchanged.

Fill values (``fill``):
* "zero": hidden positions become 0 (after a ReLU this is "no activation"; CVNet's stage-3 maps are
  pre-ReLU, where 0 is still a neutral value of the cosine correlation);
* "mean": hidden positions take the per-sample, per-channel mean of the map. The original
  Hide-and-Seek filled pixels with the dataset mean so that the statistics a filter sees at test
  time (nothing hidden) match those of training; the per-map mean is its feature-map analogue.
"""
from __future__ import annotations

import torch
from torch import nn

from irkit.errors import ConfigError

FILLS = ("zero", "mean")


def _grid(grid: int | tuple[int, int]) -> tuple[int, int]:
    gh, gw = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    if gh < 1 or gw < 1:
        raise ConfigError(f"hide-and-seek grid must be >= 1 cell per side, got {grid}")
    return gh, gw


def _cell_index(n: int, cells: int, device: torch.device) -> torch.Tensor:
    """Cell id of each of ``n`` positions when split into ``cells`` near-equal parts (cells <= n)."""
    return torch.div(torch.arange(n, device=device) * cells, n, rounding_mode="floor")


def hide_and_seek(x: torch.Tensor, p: float, grid: int | tuple[int, int] = 4, fill: str = "zero",
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hide grid cells of ``x`` [B,C,h,w]; returns (masked map, hidden mask [B,1,h,w] bool).

    The grid is clamped to the map size (a cell covers at least one position); cells are
    near-equal when h or w is not a multiple of the grid. ``p`` = 0 hides nothing, 1 everything.
    The random draw is on ``generator`` (CPU generator: draws are made on CPU, then moved).
    """
    if x.ndim != 4:
        raise ConfigError(f"hide_and_seek expects a feature map [B,C,h,w], got shape {tuple(x.shape)}")
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"hiding probability must be in [0, 1], got {p}")
    if fill not in FILLS:
        raise ConfigError(f"fill must be one of {FILLS}, got {fill!r}")
    b, _, h, w = x.shape
    gh, gw = _grid(grid)
    gh, gw = min(gh, h), min(gw, w)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    cells = torch.rand((b, gh, gw), generator=generator, device=gen_device).to(x.device) < p
    rows, cols = _cell_index(h, gh, x.device), _cell_index(w, gw, x.device)
    hidden = cells[:, rows][:, :, cols].unsqueeze(1)  # [B,1,h,w]
    if fill == "zero":
        out = x.masked_fill(hidden, 0.0)
    else:
        out = torch.where(hidden, x.mean(dim=(2, 3), keepdim=True).expand_as(x), x)
    return out, hidden


class HideAndSeek(nn.Module):
    """Module form: hides cells in ``train()`` mode, identity in ``eval()``.

    ``p`` is a plain attribute so a curriculum can set it every step
    (``hs.p = schedule.value(step)``). ``last_mask`` keeps the mask of the last training call.
    """

    def __init__(self, p: float = 0.5, grid: int | tuple[int, int] = 4, fill: str = "zero") -> None:
        super().__init__()
        if fill not in FILLS:
            raise ConfigError(f"fill must be one of {FILLS}, got {fill!r}")
        self.p, self.grid, self.fill = float(p), _grid(grid), fill
        self.last_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p <= 0.0:
            self.last_mask = None
            return x
        out, self.last_mask = hide_and_seek(x, self.p, self.grid, self.fill)
        return out

    def extra_repr(self) -> str:
        return f"p={self.p}, grid={self.grid}, fill={self.fill!r}"

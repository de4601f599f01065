"""Hide-and-Seek hides the intended fraction of grid cells, only in training."""
from __future__ import annotations

import pytest
import torch

from irkit.errors import ConfigError
from irkit.train.hide_and_seek import HideAndSeek, hide_and_seek


def test_exact_for_p0_and_p1():
    x = torch.randn(3, 5, 8, 8)
    out, mask = hide_and_seek(x, 0.0, grid=4)
    assert torch.equal(out, x) and not mask.any()
    out, mask = hide_and_seek(x, 1.0, grid=4)
    assert mask.all() and torch.count_nonzero(out) == 0
    out, _ = hide_and_seek(x, 1.0, grid=4, fill="mean")
    assert torch.allclose(out, x.mean(dim=(2, 3), keepdim=True).expand_as(x))


def test_hidden_fraction_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.ones(400, 2, 12, 12)
    for p in (0.25, 0.5):
        _, mask = hide_and_seek(x, p, grid=4, generator=g)
        # cells are 3x3 positions; per sample whole cells are hidden
        cells = mask[:, 0, ::3, ::3].float()          # [400, 4, 4], one entry per cell
        assert torch.equal(mask[:, 0], cells.repeat_interleave(3, 1).repeat_interleave(3, 2).bool())
        frac = cells.mean().item()
        # 6400 Bernoulli draws: std ~ 0.006
        assert abs(frac - p) < 0.025


def test_masked_values_and_uneven_grid():
    x = torch.randn(2, 3, 7, 10) + 5
    out, mask = hide_and_seek(x, 0.5, grid=(3, 4), generator=torch.Generator().manual_seed(1))
    assert mask.shape == (2, 1, 7, 10) and mask.dtype == torch.bool
    assert torch.all(out[mask.expand_as(x)] == 0)
    assert torch.equal(out[~mask.expand_as(x)], x[~mask.expand_as(x)])
    _, m = hide_and_seek(x, 0.5, grid=50)  # grid larger than the map: one position per cell
    assert m.shape == (2, 1, 7, 10)


def test_module_train_eval():
    hs = HideAndSeek(p=1.0, grid=2)
    x = torch.randn(2, 4, 6, 6)
    hs.train()
    assert torch.count_nonzero(hs(x)) == 0 and hs.last_mask.all()
    hs.eval()
    assert hs(x) is x and hs.last_mask is None
    hs.train()
    hs.p = 0.0  # curriculum sets p; 0 is identity even in training
    assert hs(x) is x


def test_invalid_arguments():
    with pytest.raises(ConfigError):
        hide_and_seek(torch.zeros(2, 3, 4), 0.5)
    with pytest.raises(ConfigError):
        hide_and_seek(torch.zeros(1, 1, 4, 4), 1.5)
    with pytest.raises(ConfigError):
        HideAndSeek(fill="noise")

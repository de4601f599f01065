"""Whitening: PCA-w decorrelates to unit variance, Lw separates pairs, files round-trip."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from irkit.errors import CheckpointError, ConfigError
from irkit.nn.whitening import (Whitening, apply_whitening, learn_lw, learn_pca_whitening,
                                load_whitening, save_whitening)


def _correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, d, dtype=torch.float64)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 5.0).float()


def _cov(y: torch.Tensor) -> torch.Tensor:
    y = y.double() - y.double().mean(0)
    return y.t() @ y / (y.shape[0] - 1)


def test_pca_whitening_gives_identity_covariance():
    x = _correlated(3000, 12)
    full = learn_pca_whitening(x)
    assert torch.allclose(_cov(full.apply(x, normalize=False)), torch.eye(12, dtype=torch.float64), atol=1e-3)
    reduced = learn_pca_whitening(x, dims=5)
    y = reduced.apply(x, normalize=False)
    assert y.shape == (3000, 5)
    assert torch.allclose(_cov(y), torch.eye(5, dtype=torch.float64), atol=1e-3)
    assert torch.all(reduced.eigenvalues[:-1] >= reduced.eigenvalues[1:])     # largest first
    assert torch.allclose(reduced.apply(x).norm(dim=1), torch.ones(3000), atol=1e-5)
    rotation = learn_pca_whitening(x, power=0.0)                              # power 0 = plain PCA
    assert torch.allclose(rotation.projection @ rotation.projection.t(), torch.eye(12), atol=1e-4)
    shrunk = learn_pca_whitening(x, shrinkage=1.0)
    assert _cov(shrunk.apply(x, normalize=False)).diagonal().max() < 1.0     # shrinkage damps


def _pairs(n_obj: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    d = 16
    centers = torch.randn(n_obj, d, generator=g)
    noise_scale = torch.ones(d) * 0.1
    noise_scale[:4] = 3.0                                                     # views differ along 4 dims
    a = centers + torch.randn(n_obj, d, generator=g) * noise_scale
    b = centers + torch.randn(n_obj, d, generator=g) * noise_scale
    return a, b


def _intra_over_inter(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    dist = torch.cdist(a, b)
    intra = dist.diagonal().mean()
    inter = (dist.sum() - dist.diagonal().sum()) / (dist.numel() - dist.shape[0])
    return float(intra / inter)


def test_lw_reduces_intra_pair_distance():
    a, b = _pairs(400, seed=1)
    x = torch.cat([a, b])
    idx = torch.arange(400)
    lw = learn_lw(x, idx, idx + 400)
    ta, tb = _pairs(200, seed=2)                                              # held-out pairs
    before = _intra_over_inter(ta, tb)
    after = _intra_over_inter(lw.apply(ta), lw.apply(tb))
    assert after < 0.5 * before
    reduced = learn_lw(x, idx, idx + 400, dims=8)
    assert reduced.projection.shape == (8, 16) and reduced.kind == "lw"
    with pytest.raises(ConfigError):
        learn_lw(x, idx, idx[:10])


def test_save_load_round_trip_and_module(tmp_path):
    x = _correlated(500, 8)
    params = learn_pca_whitening(x, dims=6)
    path = save_whitening(params, tmp_path / "w.safetensors")
    back = load_whitening(path)
    assert back.kind == "pca"
    for name in ("mean", "projection", "eigenvalues"):
        assert torch.equal(getattr(back, name), getattr(params, name))
    module = Whitening.from_params(back)
    assert torch.allclose(module(x), apply_whitening(x, params.mean, params.projection), atol=1e-5)
    assert set(module.state_dict()) == {"fc.weight", "fc.bias"}
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError):
        load_whitening(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError):
        load_whitening(tmp_path / "absent.safetensors")

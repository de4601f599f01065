"""The R-MAC grid against an independent transliteration of Tolias et al.'s
``rmac_regionvec_act.m`` on every map of 1..160 x 1..160 and L = 1, 2, 3; R-MAC outputs on those
grids; trainable GeM p; region whitening against a numpy PCA-whitening written from its definition."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from irkit.errors import ConfigError
import irkit.models.rmac as rmac_model
from irkit.models.rmac import RMACNet
from irkit.nn.pooling import RMAC, learn_region_whitening, rmac, rmac_regions

SIZES = range(1, 161)


def reference_levels(W: int, H: int, L: int, ovr: float = 0.4) -> list[list[tuple[int, int, int, int]]]:
    """rmac_regionvec_act.m, level by level (boxes x1, y1, x2, y2, end-exclusive, 0-based)."""
    w = min(W, H)
    errs = []
    for steps in (2, 3, 4, 5, 6, 7):
        b = (max(H, W) - w) / (steps - 1)                    # float64, as MATLAB
        errs.append(abs((w ** 2 - w * b) / w ** 2 - ovr))
    idx = errs.index(min(errs)) + 1                          # MATLAB min: the first minimum
    Wd = idx if H < W else 0
    Hd = idx if H > W else 0
    levels = []
    for l in range(1, L + 1):
        wl = math.floor(2 * w / (l + 1))
        wl2 = math.floor(wl / 2 - 1)
        bw = (W - wl) / (l + Wd - 1) if l + Wd - 1 else 0.0   # 0/0 -> NaN -> 0 at level 1
        bh = (H - wl) / (l + Hd - 1) if l + Hd - 1 else 0.0
        cen_w = [math.floor(wl2 + k * bw) + 1 for k in range(l + Wd)]   # 1-based centres
        cen_h = [math.floor(wl2 + k * bh) + 1 for k in range(l + Hd)]
        level = []
        for i in cen_h:
            for j in cen_w:
                rows = range(i - wl2, i - wl2 + wl)         # MATLAB i_ + (-wl2 : wl-wl2-1), 1-based
                cols = range(j - wl2, j - wl2 + wl)
                if len(rows) == 0 or len(cols) == 0:         # ~min(size(R)): skipped
                    continue
                level.append((cols[0] - 1, rows[0] - 1, cols[-1], rows[-1]))
        levels.append(level)
    return levels


def test_grid_equals_reference_on_every_map_up_to_160():
    mismatches = []
    for W in SIZES:
        for H in SIZES:
            levels = reference_levels(W, H, 3)
            for L in (1, 2, 3):
                expected = [box for level in levels[:L] for box in level]
                got = [tuple(b) for b in rmac_regions(H, W, L).tolist()]
                if got != expected:
                    mismatches.append((W, H, L))
    assert not mismatches, f"{len(mismatches)} grids differ, e.g. (W, H, L) = {mismatches[:5]}"


def test_grid_known_cases():
    # side 1: only level 1 survives (wl = floor(2/3) = 0 at l = 2)
    assert rmac_regions(1, 1, L=3).tolist() == [[0, 0, 1, 1]]
    assert rmac_regions(40, 1, L=3).tolist() == [[0, k, 1, k + 1] for k in
                                                 [b[1] for b in reference_levels(1, 40, 1)[0]]]
    # 15 x 71 at L = 3: the last region of level 2 ends on the border (float rounding used to stop at 70)
    boxes = rmac_regions(71, 15, L=3)
    assert int(boxes[:, 3].max()) == 71 and int(boxes[:, 2].max()) == 15
    # exact tie of the overlap error: 9 x 33 (n = 5 and n = 6 both 1/15 away from 0.4 on paper)
    assert [tuple(b) for b in rmac_regions(33, 9, L=1).tolist()] == reference_levels(9, 33, 1)[0]
    # every level of every map spans the map from border to border
    for W, H in ((15, 71), (160, 7), (2, 3), (97, 131)):
        for level in reference_levels(W, H, 3):
            if level:
                assert min(b[0] for b in level) == 0 and max(b[2] for b in level) == W
                assert min(b[1] for b in level) == 0 and max(b[3] for b in level) == H


def _reference_rmac(x: np.ndarray, L: int) -> np.ndarray:
    """Max-pool per region -> L2 -> sum -> L2 on the reference grid. x: [C, H, W]."""
    C, H, W = x.shape
    total = np.zeros(C)
    for level in reference_levels(W, H, L):
        for x1, y1, x2, y2 in level:
            v = x[:, y1:y2, x1:x2].reshape(C, -1).max(axis=1)
            total += v / np.linalg.norm(v)
    return total / np.linalg.norm(total)


def test_rmac_outputs_on_sampled_maps():
    rng = np.random.default_rng(0)
    shapes = {(1, 1), (1, 160), (160, 1), (15, 71), (71, 15), (9, 33), (33, 9), (2, 2), (160, 160)}
    shapes |= {tuple(int(v) for v in rng.integers(1, 161, size=2)) for _ in range(120)}
    for W, H in sorted(shapes):
        x = rng.random((3, H, W)) + 0.01
        for L in (1, 2, 3):
            got = rmac(torch.from_numpy(x)[None], L=L)[0].numpy()
            np.testing.assert_allclose(got, _reference_rmac(x, L), rtol=1e-10, atol=1e-12,
                                       err_msg=f"W={W} H={H} L={L}")


def test_rmac_gem_p_is_trainable_like_gem():
    torch.manual_seed(0)
    module = RMAC(L=2, kind="gem", p=3.0)
    assert isinstance(module.p, torch.nn.Parameter) and "p" in dict(module.named_parameters())
    module(torch.rand(2, 4, 9, 13) + 0.1).sum().backward()
    assert module.p.grad is not None and float(module.p.grad.abs()) > 0
    fixed = RMAC(L=2, kind="gem", p=3.0, learn_p=False)
    assert "p" not in dict(fixed.named_parameters()) and "p" not in fixed.state_dict()
    assert "p" not in dict(RMAC(L=2).named_parameters())                 # max: no p to learn
    with pytest.raises(ConfigError, match="kind"):
        RMAC(kind="mean")


def _numpy_pca_whitening(r: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    mean = r.mean(0)
    cov = np.cov((r - mean).T)                               # unbiased; the scale is irrelevant after L2
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1][:dims]
    return mean, vecs[:, order].T / np.sqrt(vals[order])[:, None]


@pytest.mark.parametrize("kind", ["max", "gem"])
def test_region_whitening_is_pca_whitening_of_the_regions(kind):
    g = torch.Generator().manual_seed(1)
    maps = [torch.rand(2, 6, 7, 11, generator=g, dtype=torch.float64) + 0.05,
            torch.rand(6, 12, 9, generator=g, dtype=torch.float64) + 0.05]
    params = learn_region_whitening(maps, L=2, kind=kind, p=3.0, dims=4)
    regions = []                                              # independent: slice, pool, L2
    for m in maps:
        m = m.numpy().reshape(-1, *m.shape[-3:])
        for img in m:
            C, H, W = img.shape
            for level in reference_levels(W, H, 2):
                for x1, y1, x2, y2 in level:
                    patch = img[:, y1:y2, x1:x2].reshape(C, -1)
                    v = patch.max(1) if kind == "max" else np.mean(patch ** 3, 1) ** (1 / 3)
                    regions.append(v / np.linalg.norm(v))
    mean, proj = _numpy_pca_whitening(np.array(regions), 4)
    np.testing.assert_allclose(params.mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    got = params.projection.double().numpy()
    signs = np.sign(np.sum(got * proj, axis=1))              # eigenvectors are defined up to sign
    np.testing.assert_allclose(got, proj * signs[:, None], rtol=1e-4, atol=1e-4)

    module = RMAC(L=2, kind=kind, dim=6, out_dim=4, learn_p=False).double()
    module.init_whitening(maps)
    np.testing.assert_allclose(module.proj.shift.detach().numpy(), mean, rtol=1e-5, atol=1e-6)
    # the projection whitens the regions: unit covariance of W (r - mu)
    y = (np.array(regions) - mean) @ module.proj.fc.weight.detach().numpy().T
    np.testing.assert_allclose(np.cov(y.T), np.eye(4), atol=1e-3)
    with pytest.raises(ConfigError, match="no region projection"):
        RMAC(L=2).init_whitening(maps)


class _TinyBackbone(torch.nn.Conv2d):
    """A small stand-in for the ResNet (8 channels, stride 4)."""

    out_channels = 8

    def __init__(self, depth: int) -> None:
        super().__init__(3, 8, 4, stride=4)


def test_rmacnet_init_region_whitening_from_images(monkeypatch):
    monkeypatch.setattr(rmac_model, "ResNet", _TinyBackbone)
    net = RMACNet(depth=50, L=2)
    conv = net.backbone
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(2, 3, 40, 56, generator=g), torch.rand(1, 3, 48, 48, generator=g)]
    with torch.no_grad():
        maps = [conv(x).double() for x in images]
    params = net.init_region_whitening(images)
    direct = learn_region_whitening(maps, L=2, dims=net.dim)
    assert torch.allclose(net.pool.proj.shift.detach(), direct.mean, atol=1e-5)
    assert torch.allclose(params.mean, direct.mean, atol=1e-5)
    assert net.training                                               # mode restored

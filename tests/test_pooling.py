"""Pooling against direct formulas; the R-MAC grid against boxes worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from irkit.nn.pooling import (MAC, RMAC, SPoC, GeM, gem, mac, pool_regions, regional_gem, rmac,
                              rmac_regions, spoc)


@pytest.fixture
def fmap() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 5, 6, 10, generator=g, dtype=torch.float64) + 0.05


def test_mac_spoc_formulas(fmap):
    flat = fmap.flatten(2)
    assert torch.equal(mac(fmap), flat.max(dim=2).values)
    assert torch.allclose(spoc(fmap), flat.sum(dim=2) / flat.shape[2])
    assert torch.equal(MAC()(fmap), mac(fmap)) and torch.equal(SPoC()(fmap), spoc(fmap))


def test_gem_direct_formula_and_limits(fmap):
    p = 3.0
    expected = (fmap.flatten(2) ** p).mean(dim=2) ** (1 / p)
    assert torch.allclose(gem(fmap, p), expected)
    assert torch.allclose(gem(fmap, 1.0), spoc(fmap))                       # p = 1 is SPoC
    errs = [(gem(fmap, q) - mac(fmap)).abs().div(mac(fmap)).max().item() for q in (10.0, 100.0, 1000.0)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.01                    # p -> inf is MAC
    module = GeM(p=3.0, learn_p=False)
    assert torch.allclose(module(fmap.float()), expected.float(), atol=1e-6)
    assert "p" not in module.state_dict()


def _level(side, ys, xs):
    return [(x, y, x + side, y + side) for y in ys for x in xs]


def test_rmac_grid_square():
    # H = W = 6, no extra regions. l=1: side floor(12/2)=6, one region. l=2: side floor(12/3)=4,
    # 2 x 2 regions, step (6-4)/1 = 2.
    expected = _level(6, [0], [0]) + _level(4, [0, 2], [0, 2])
    assert rmac_regions(6, 6, L=2).tolist() == [list(b) for b in expected]


def test_rmac_grid_wide():
    # H=6, W=10: level-1 squares of side 6; n=2 along W gives step 4 -> overlap 2/6=0.33 (|.|=0.067),
    # n=3 step 2 -> 0.67 (0.27): n=2, one extra region along W at every level.
    # l=1: x in {0, 4}. l=2: side 4; H: 2 regions step 2 -> {0, 2}; W: 3 regions step 3 -> {0, 3, 6}.
    expected = _level(6, [0], [0, 4]) + _level(4, [0, 2], [0, 3, 6])
    assert rmac_regions(6, 10, L=2).tolist() == [list(b) for b in expected]
    with_whole = rmac_regions(6, 10, L=2, whole_image=True).tolist()
    assert with_whole[0] == [0, 0, 10, 6] and with_whole[1:] == [list(b) for b in expected]


def test_rmac_grid_tall_three_levels():
    # H=16, W=7: n=2 step 9 -> overlap -0.29; n=3 step 4.5 -> 0.357 (best); n=4 step 3 -> 0.571.
    # Two extra regions along H. l=1: side 7, y = floor(0, 4.5, 9) = 0, 4, 9.
    # l=2: side floor(14/3)=4; x step 3 -> {0,3}; 4 rows, step 12/3=4 -> {0,4,8,12}.
    # l=3: side floor(14/4)=3; x step 2 -> {0,2,4}; 5 rows, step 13/4=3.25 -> {0,3,6,9,13}.
    expected = (_level(7, [0, 4, 9], [0]) + _level(4, [0, 4, 8, 12], [0, 3])
                + _level(3, [0, 3, 6, 9, 13], [0, 2, 4]))
    assert rmac_regions(16, 7, L=3).tolist() == [list(b) for b in expected]


def test_rmac_grid_matches_published_dir_example():
    # DIR's region generator lists for a 280x496 image: [0,279]x[0,279], [216,495]; then side-186
    # squares at x = 0, 155, 310 on rows y = 0 and 94 (inclusive ends there, exclusive here).
    expected = _level(280, [0], [0, 216]) + _level(186, [0, 94], [0, 155, 310])
    assert rmac_regions(280, 496, L=2).tolist() == [list(b) for b in expected]


def test_pool_regions_against_slicing(fmap):
    boxes = torch.tensor([[0, 0, 4, 3], [2, 1, 10, 6], [5, 5, 6, 6]])
    for kind, fn in (("max", lambda t: t.amax(dim=(-2, -1))), ("avg", lambda t: t.mean(dim=(-2, -1))),
                     ("gem", lambda t: (t ** 3).mean(dim=(-2, -1)) ** (1 / 3))):
        out = pool_regions(fmap, boxes, kind)
        assert out.shape == (2, 3, 5)
        for r, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
            assert torch.allclose(out[:, r], fn(fmap[:, :, y1:y2, x1:x2]))
    per_image = torch.stack([boxes, boxes.flip(0)])
    out = pool_regions(fmap, per_image, "max")
    x1, y1, x2, y2 = boxes[0].tolist()
    assert torch.allclose(out[1, 2], fmap[1, :, y1:y2, x1:x2].amax(dim=(-2, -1)))
    with pytest.raises(ValueError, match="empty region"):
        pool_regions(fmap, [[3, 3, 3, 5]])


def test_rmac_aggregation_formula(fmap):
    boxes = rmac_regions(6, 10, L=2)
    manual = torch.zeros(2, 5, dtype=fmap.dtype)
    for x1, y1, x2, y2 in boxes.tolist():
        manual += F.normalize(fmap[:, :, y1:y2, x1:x2].amax(dim=(-2, -1)), dim=-1)
    assert torch.allclose(rmac(fmap, L=2), F.normalize(manual, dim=-1))
    gem_manual = torch.zeros(2, 5, dtype=fmap.dtype)
    for x1, y1, x2, y2 in boxes.tolist():
        region = fmap[:, :, y1:y2, x1:x2]
        gem_manual += F.normalize((region ** 3).mean(dim=(-2, -1)) ** (1 / 3), dim=-1)
    assert torch.allclose(regional_gem(fmap, L=2, p=3.0), F.normalize(gem_manual, dim=-1))


def test_rmac_module_with_projection(fmap):
    x = fmap.float()
    module = RMAC(L=2, dim=5)
    mean, proj = torch.randn(5), torch.randn(5, 5)
    module.proj.init_from_whitening(mean, proj)
    manual = torch.zeros(2, 5)
    for x1, y1, x2, y2 in rmac_regions(6, 10, 2).tolist():
        r = F.normalize(x[:, :, y1:y2, x1:x2].amax(dim=(-2, -1)), dim=-1)
        manual += F.normalize((r - mean) @ proj.t(), dim=-1)
    assert torch.allclose(module(x), F.normalize(manual, dim=-1), atol=1e-5)
    out = module(x, boxes=torch.tensor([[0, 0, 10, 6]]))                  # proposals replace the grid
    r = F.normalize(mac(x), dim=-1)
    assert torch.allclose(out, F.normalize((r - mean) @ proj.t(), dim=-1), atol=1e-5)
    out.sum().backward()
    assert module.proj.fc.weight.grad is not None and module.proj.shift.grad is not None


def test_rmac_regions_degenerate_maps():
    assert rmac_regions(1, 1, L=3).tolist() == [[0, 0, 1, 1]]  # levels of side floor(2/3) = 0 are skipped
    b = rmac_regions(2, 3, L=2)
    assert (b[:, 2] <= 3).all() and (b[:, 3] <= 2).all() and ((b[:, 2:] - b[:, :2]) >= 1).all()
    assert math.isclose(float(rmac(torch.rand(1, 4, 2, 3), L=2).norm()), 1.0, rel_tol=1e-5)

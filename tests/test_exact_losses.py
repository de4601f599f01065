"""cirtorch's loss conventions (packed tuples + labels, sum, coefficient 1) against the published
formulas written as plain loops; MadaCos' alpha (the paper's name) and its alias a."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from irkit.errors import ConfigError
from irkit.train.losses import ContrastiveLoss, MadaCos, TripletLoss, madacos_scale_margin, unpack_tuples


def _packed(n_tuples: int, n_neg: int, dim: int, seed: int):
    """Tuples (q, p, n_1..n_k) one after the other, labels -1, 1, 0...; some positives close."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n_tuples * (2 + n_neg), dim, generator=g, dtype=torch.float64), dim=1)
    size = 2 + n_neg
    for t in range(n_tuples):
        if t % 2:
            x[t * size + 1] = F.normalize(x[t * size] + 0.2 * x[t * size + 1], dim=0)
        x[t * size + 2] = F.normalize(x[t * size] + 0.6 * x[t * size + 2], dim=0)   # a hard negative
    label = torch.tensor(([-1, 1] + [0] * n_neg) * n_tuples)
    return x, label


def _cols(x):
    return [[float(v) for v in row] for row in x]


@pytest.mark.parametrize("n_tuples,n_neg,eps", [(1, 1, 0.0), (3, 5, 0.0), (4, 2, 1e-6), (2, 7, 1e-3)])
def test_cirtorch_contrastive_is_the_published_formula(n_tuples, n_neg, eps):
    # L = sum over (query, image) pairs of each tuple of ½ l d² + ½ (1 − l) max(0, τ − d)²,
    # d = ‖q − x + eps‖ (cirtorch adds eps to the difference), τ = 0.7
    x, label = _packed(n_tuples, n_neg, 6, seed=n_tuples * 10 + n_neg)
    rows, size = _cols(x), 2 + n_neg
    ref = 0.0
    for t in range(n_tuples):
        q = rows[t * size]
        for i in range(1, size):
            xi, lab = rows[t * size + i], int(label[t * size + i])
            d = math.sqrt(sum((a - b + eps) ** 2 for a, b in zip(q, xi)))
            ref += 0.5 * lab * d * d + 0.5 * (1 - lab) * max(0.0, 0.7 - d) ** 2
    got = ContrastiveLoss.cirtorch(eps=eps)(x, label)
    assert float(got) == pytest.approx(ref, rel=1e-12, abs=1e-15)
    # the same numbers through irkit's pair API when eps plays no role
    if eps == 0.0:
        q, other, lbl = unpack_tuples(x, label)
        pairs = ContrastiveLoss(margin=0.7, reduction="sum", eps=0.0)(q, other, lbl)
        assert float(pairs) == pytest.approx(ref, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("n_tuples,n_neg", [(1, 1), (3, 5), (5, 2)])
def test_cirtorch_triplet_is_the_published_formula(n_tuples, n_neg):
    # L = sum over tuples and negatives of max(0, ‖q − p‖² − ‖q − n‖² + m), m = 0.1, coefficient 1
    x, label = _packed(n_tuples, n_neg, 5, seed=n_tuples + n_neg)
    rows, size = _cols(x), 2 + n_neg
    ref = 0.0
    for t in range(n_tuples):
        q, p = rows[t * size], rows[t * size + 1]
        dp = sum((a - b) ** 2 for a, b in zip(q, p))
        for i in range(2, size):
            dn = sum((a - b) ** 2 for a, b in zip(q, rows[t * size + i]))
            ref += max(0.0, dp - dn + 0.1)
    assert ref > 0
    assert float(TripletLoss.cirtorch()(x, label)) == pytest.approx(ref, rel=1e-12)
    # irkit's API: q, p [N, D], n [N, K, D]; coef 1 + sum is the same loss
    xs = x.reshape(n_tuples, size, -1)
    plain = TripletLoss(margin=0.1, coef=1.0, reduction="sum")(xs[:, 0], xs[:, 1], xs[:, 2:])
    assert float(plain) == pytest.approx(ref, rel=1e-12)
    # the positive may sit anywhere after the query
    perm = torch.tensor([0, 2, 1] + list(range(3, size)))
    shuffled = torch.cat([xs[t, perm] for t in range(n_tuples)])
    lab2 = torch.cat([label[:size][perm]] * n_tuples)
    assert float(TripletLoss.cirtorch()(shuffled, lab2)) == pytest.approx(ref, rel=1e-12)


def test_packed_gradients_flow_and_bad_tuples_are_refused():
    x, label = _packed(2, 3, 4, seed=1)
    x.requires_grad_(True)
    (ContrastiveLoss.cirtorch()(x, label) + TripletLoss.cirtorch()(x, label)).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    x = x.detach()
    with pytest.raises(ConfigError, match="-1 \\(query\\)"):
        ContrastiveLoss.cirtorch()(x, label * 2)
    with pytest.raises(ConfigError, match="start with its query"):
        ContrastiveLoss.cirtorch()(x, label.roll(1))
    with pytest.raises(ConfigError, match="equal size"):
        ContrastiveLoss.cirtorch()(x[:-1], label[:-1])
    two_pos = label.clone()
    two_pos[2] = 1
    with pytest.raises(ConfigError, match="exactly one positive"):
        TripletLoss.cirtorch()(x, two_pos)
    with pytest.raises(ConfigError, match="forward\\(x, label\\)"):
        TripletLoss.cirtorch()(x, label, x)
    with pytest.raises(ConfigError, match="forward\\(a, b, target\\)"):
        ContrastiveLoss()(x, label)
    with pytest.raises(ConfigError, match="layout"):
        TripletLoss(layout="tuples")


def test_madacos_alpha_and_alias():
    assert MadaCos(8, 6).alpha == 0.02 == MadaCos(8, 6).a
    assert MadaCos(8, 6, alpha=0.05).a == 0.05 and MadaCos(8, 6, a=0.05).alpha == 0.05
    assert MadaCos(8, 6, 0.05).alpha == 0.05                                  # positional stays alpha
    with pytest.raises(ConfigError, match="disagree"):
        MadaCos(8, 6, alpha=0.05, a=0.1)
    with pytest.raises(ConfigError, match="alpha must lie in"):
        MadaCos(8, 6, alpha=1.5)
    g = torch.Generator().manual_seed(0)
    cos = torch.rand(5, 30, generator=g, dtype=torch.float64) * 0.8 - 0.2
    y = torch.randint(0, 30, (5,), generator=g)
    cos[torch.arange(5), y] = torch.tensor([0.6, 0.65, 0.7, 0.75, 0.8], dtype=torch.float64)  # s, m unclipped
    assert madacos_scale_margin(cos, y, alpha=0.05) == madacos_scale_margin(cos, y, a=0.05)
    assert madacos_scale_margin(cos, y) == madacos_scale_margin(cos, y, 0.02)
    assert madacos_scale_margin(cos, y, alpha=0.05) != madacos_scale_margin(cos, y)

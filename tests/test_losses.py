"""Losses of irkit.train.losses against formulas computed independently (numpy / loops)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from irkit.errors import ConfigError
from irkit.train.losses import (ArcFace, ContrastiveLoss, CosFace, CurricularFace, DescriptorQueue, JointLoss,
                                MadaCos, MomentumContrastiveLoss, MomentumEncoder, TripletLoss,
                                madacos_scale_margin)

torch.set_default_dtype(torch.float32)


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def _np_ce(logits: np.ndarray, y: np.ndarray) -> float:
    out = []
    for row, t in zip(logits, y):
        mx = row.max()
        out.append(-(row[t] - mx - math.log(np.exp(row - mx).sum())))
    return float(np.mean(out))


def _np_cos(f: np.ndarray, w: np.ndarray) -> np.ndarray:
    fn = f / np.linalg.norm(f, axis=1, keepdims=True)
    wn = w / np.linalg.norm(w, axis=1, keepdims=True)
    return fn @ wn.T


# ------------------------------------------------------------------------------------------------ pairs
def test_contrastive_matches_loop():
    a, b = _unit(10, 6, 0), _unit(10, 6, 1)
    b[:3] = a[:3] * 0.9 + 0.1 * b[:3]
    t = torch.tensor([1, 1, 1, 0, 0, 1, 0, 0, 1, 0])
    loss = ContrastiveLoss(margin=0.7, reduction="sum", eps=0.0)(a, b, t)
    ref = 0.0
    for i in range(10):
        d = math.sqrt(sum((float(a[i, k]) - float(b[i, k])) ** 2 for k in range(6)))
        ref += 0.5 * d * d if t[i] else 0.5 * max(0.0, 0.7 - d) ** 2
    assert loss.item() == pytest.approx(ref, rel=1e-9, abs=1e-12)
    mean = ContrastiveLoss(margin=0.7, eps=0.0)(a, b, t)
    assert float(mean) == pytest.approx(ref / 10, rel=1e-9)


def test_contrastive_known_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)   # d = √2, √2, 0
    t = torch.tensor([1, 0, 0])
    loss = ContrastiveLoss(margin=2.0, reduction="none", eps=0.0)(a, b, t)
    np.testing.assert_allclose(loss.numpy(), [1.0, 0.5 * (2 - math.sqrt(2)) ** 2, 2.0], rtol=1e-12)


@pytest.mark.parametrize("squared", [True, False])
def test_triplet_matches_numpy(squared):
    q, p = _unit(7, 5, 2), _unit(7, 5, 3)
    n = _unit(21, 5, 4).reshape(7, 3, 5)
    loss = TripletLoss(margin=0.3, squared=squared, coef=0.5, reduction="sum", eps=0.0)(q, p, n)
    qn, pn, nn_ = q.numpy(), p.numpy(), n.numpy()
    ref = 0.0
    for i in range(7):
        dp = np.sum((qn[i] - pn[i]) ** 2)
        for k in range(3):
            dn = np.sum((qn[i] - nn_[i, k]) ** 2)
            if not squared:
                dp_, dn_ = math.sqrt(dp), math.sqrt(dn)
            else:
                dp_, dn_ = dp, dn
            ref += 0.5 * max(0.0, 0.3 + dp_ - dn_)
    assert loss.item() == pytest.approx(ref, rel=1e-9)


def test_triplet_known_value_methods_form():
    # METHODS §4: L = ½·max(0, m + |q−p|² − |q−n|²), m = 0.1
    q = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[1.0, 0.0]])
    n = torch.tensor([[math.cos(0.2), math.sin(0.2)]])
    dn = 2 - 2 * math.cos(0.2)
    assert float(TripletLoss()(q, p, n)) == pytest.approx(0.5 * (0.1 - dn), rel=1e-5)
    assert float(TripletLoss(coef=1.0)(q, p, n)) == pytest.approx(0.1 - dn, rel=1e-5)
    with pytest.raises(ConfigError):
        TripletLoss()(q, p, torch.zeros(2, 2))


# ------------------------------------------------------------------------------------------------ margin heads
def _head_inputs(head, seed=5, n=9):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, head.in_features, generator=g, dtype=torch.float64)
    y = torch.randint(0, head.num_classes, (n,), generator=g)
    head.double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.num_classes, head.in_features, generator=g, dtype=torch.float64))
    return f, y


def _np_arc(c: float, m: float) -> float:
    th = math.acos(max(-1.0, min(1.0, c)))
    return math.cos(th + m) if th + m <= math.pi else c - m * math.sin(m)


def test_cosface_matches_numpy():
    head = CosFace(6, 5, scale=30.0, margin=0.35)
    f, y = _head_inputs(head)
    cos = _np_cos(f.numpy(), head.weight.detach().numpy())
    logits = 30.0 * (cos - 0.35 * np.eye(5)[y.numpy()])
    assert float(head(f, y).detach()) == pytest.approx(_np_ce(logits, y.numpy()), rel=1e-9)


def test_arcface_matches_numpy():
    head = ArcFace(6, 5, scale=16.0, margin=0.5)
    f, y = _head_inputs(head)
    cos = _np_cos(f.numpy(), head.weight.detach().numpy())
    logits = cos.copy()
    for i, t in enumerate(y.numpy()):
        logits[i, t] = _np_arc(cos[i, t], 0.5)
    assert float(head(f, y).detach()) == pytest.approx(_np_ce(16.0 * logits, y.numpy()), rel=1e-9)
    # a target beyond π − m takes the continuation cos θ − m·sin m
    c = torch.tensor([[-0.99, 0.1]], dtype=torch.float64)
    from irkit.train.losses import _arc_target
    assert float(_arc_target(c, 0.5)[0, 0]) == pytest.approx(-0.99 - 0.5 * math.sin(0.5))


def test_curricularface_matches_numpy_and_updates_t():
    head = CurricularFace(6, 5, scale=16.0, margin=0.5, momentum=0.01)
    f, y = _head_inputs(head)
    w = head.weight.detach().numpy()
    t = 0.0
    for step in range(2):
        cos = _np_cos(f.numpy(), w)
        cos_y = cos[np.arange(len(y)), y.numpy()]
        t = 0.99 * t + 0.01 * cos_y.mean()            # EMA updated before the logits
        logits = np.empty_like(cos)
        for i, yi in enumerate(y.numpy()):
            tgt = _np_arc(cos[i, yi], 0.5)
            for j in range(5):
                if j == yi:
                    logits[i, j] = tgt
                else:
                    logits[i, j] = cos[i, j] * (t + cos[i, j]) if cos[i, j] > tgt else cos[i, j]
        assert float(head(f, y).detach()) == pytest.approx(_np_ce(16.0 * logits, y.numpy()), rel=1e-9)
        assert float(head.t) == pytest.approx(t, rel=1e-9)
    head.eval()
    head(f, y)
    assert float(head.t) == pytest.approx(t, rel=1e-9)     # no update in eval


def test_head_label_check():
    with pytest.raises(ConfigError):
        CosFace(4, 3)(torch.randn(2, 4), torch.tensor([0, 3]))


# ------------------------------------------------------------------------------------------------ MadaCos
A = 0.02


def _madacos_np(cos: np.ndarray, y: np.ndarray, training=True):
    """Independent numpy implementation of METHODS §3 (lower median)."""
    cy = cos[np.arange(len(y)), y]
    order = np.argsort(cy, kind="stable")
    i_med = order[(len(cy) - 1) // 2]
    med = cy[i_med]
    s = max(32.0, math.log(9999999 * (1 - A) / A) / (1 - med))
    b = sum(math.exp(s * cos[i_med, j]) for j in range(cos.shape[1]) if j != y[i_med])
    m = max(0.0, med - math.log(b * A / (1 - A)) / s) if training else 0.0
    logits = s * (cos - m * np.eye(cos.shape[1])[y])
    return s, m, med, logits, i_med


def test_madacos_matches_numpy():
    head = MadaCos(8, 6)
    f, y = _head_inputs(head, seed=11, n=7)
    loss = head(f, y)
    cos = _np_cos(f.numpy(), head.weight.detach().numpy())
    s, m, med, logits, _ = _madacos_np(cos, y.numpy())
    assert head.last_s == pytest.approx(s, rel=1e-9)
    assert head.last_m == pytest.approx(m, rel=1e-9, abs=1e-12)
    assert head.last_median == pytest.approx(med, rel=1e-9)
    assert loss.item() == pytest.approx(_np_ce(logits, y.numpy()), rel=1e-9)


def _cos_batch(meds_other, med, c, num_classes):
    """Cosine matrix: target cosines `meds_other + [med]` (label j -> column j), all non-targets = c."""
    tc = list(meds_other) + [med]
    cos = torch.full((len(tc), num_classes), c, dtype=torch.float64)
    y = torch.arange(len(tc))
    cos[y, y] = torch.tensor(tc, dtype=torch.float64)
    return cos, y


def test_madacos_median_sample_probability_is_a():
    g = torch.Generator().manual_seed(3)
    for n in (5, 6):   # odd and even batch
        cos = torch.rand(n, 40, generator=g, dtype=torch.float64) * 0.6 - 0.1
        y = torch.randint(0, 40, (n,), generator=g)
        cos[torch.arange(n), y] = torch.linspace(0.3, 0.7, n, dtype=torch.float64)
        head = MadaCos(2, 40)
        logits = head.logits_from_cos(cos, y)
        s, m, med, _, i_med = _madacos_np(cos.numpy(), y.numpy())
        assert head.last_m > 0
        assert head.last_median == pytest.approx(med)
        # even batch: lower median of the 6 target cosines
        assert med == pytest.approx(float(torch.sort(cos[torch.arange(n), y]).values[(n - 1) // 2]))
        prob = torch.softmax(logits[i_med], dim=0)[y[i_med]]
        assert float(prob) == pytest.approx(A, rel=1e-9)


# Known values: the brief's (s, m) at med = 0.196, 0.536, 0.807.  s depends on med only.  m needs
# B, i.e. the non-target cosines of the median sample: with C = 247 classes (246 non-targets) all
# at cosine 0.083 every m is reproduced within 0.002 (least-squares fit of one uniform setting; no
# single setting reproduces all three exactly — non-target cosines all 0 would need C−1 = 3684,
# 8297 and 1.56M non-targets respectively).
@pytest.mark.parametrize("med,s_exp,m_exp", [(0.196, 32.0, 0.061), (0.536, 43.1, 0.417), (0.807, 103.7, 0.707)])
def test_madacos_known_values(med, s_exp, m_exp):
    cos, y = _cos_batch([med - 0.05, med + 0.05], med, 0.083, 247)
    s, m, got_med = madacos_scale_margin(cos, y, a=A)
    assert got_med == pytest.approx(med)
    assert s == pytest.approx(s_exp, abs=0.05)
    assert m == pytest.approx(m_exp, abs=0.002)
    # exact reproduction of the brief's m with per-case B (non-target cosines all 0, C−1 = B)
    b_needed = 49.0 * math.exp((med - m_exp) * s)
    n_nt = int(round(b_needed))
    if n_nt < 10000:
        cos0, y0 = _cos_batch([], med, 0.0, n_nt + 1)
        _, m0, _ = madacos_scale_margin(cos0, y0, a=A)
        assert m0 == pytest.approx(m_exp, abs=5e-4)


def test_madacos_gradient_only_through_cos_and_eval_margin_zero():
    head = MadaCos(8, 6)
    f, y = _head_inputs(head, seed=12, n=6)
    f.requires_grad_(True)
    loss = head(f, y)
    gf, gw = torch.autograd.grad(loss, [f, head.weight])
    s, m = head.last_s, head.last_m
    assert isinstance(s, float) and isinstance(m, float)
    f2 = f.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(s * (head.cosine(f2) - m * F.one_hot(y, 6).double()), y)   # s, m constants
    gf2, gw2 = torch.autograd.grad(ref, [f2, head.weight])
    torch.testing.assert_close(gf, gf2)
    torch.testing.assert_close(gw, gw2)
    head.eval()
    loss_eval = head(f, y)
    assert head.last_m == 0.0 and head.last_s == pytest.approx(s)
    ref_eval = F.cross_entropy(s * head.cosine(f), y)
    assert loss_eval.item() == pytest.approx(ref_eval.item(), rel=1e-9)


# ------------------------------------------------------------------------------------------------ joint
def test_joint_loss_formula_and_gradients():
    torch.manual_seed(0)
    jl = JointLoss(8, 4, rank="triplet", cls_scale=10.0, init_w=(0.3, -0.2), w_max=4.0).double()
    f = torch.randn(12, 8, dtype=torch.float64)
    y = torch.arange(12) % 4
    loss = jl(f, y)
    lc, lr = jl.last["cls"], jl.last["rank"]
    assert lc == pytest.approx(jl.cls(f, y).item(), rel=1e-12)
    w1, w2 = jl.w.tolist()          # 0.3, -0.2 up to float32 rounding of the init
    assert loss.item() == pytest.approx(math.exp(-w1) * lc + math.exp(-w2) * lr + w1 + w2, rel=1e-9)
    (gw,) = torch.autograd.grad(loss, [jl.w])
    np.testing.assert_allclose(gw.numpy(), [1 - math.exp(-w1) * lc, 1 - math.exp(-w2) * lr], rtol=1e-9)
    # clamp: beyond w_max the weight stays e^{-w_max} and L is bounded below by -2 w_max
    with torch.no_grad():
        jl.w.fill_(-50.0)
    assert jl.combine(torch.tensor(0.0), torch.tensor(0.0)).item() == pytest.approx(-8.0)
    jc = JointLoss(8, 4, rank="contrastive").double()
    assert torch.isfinite(jc(f, y))
    with pytest.raises(ConfigError):
        JointLoss(8, 4, rank="nope")


# ------------------------------------------------------------------------------------------------ momentum
def test_momentum_encoder_ema():
    torch.manual_seed(0)
    online = torch.nn.Linear(3, 2)
    enc = MomentumEncoder(online, momentum=0.9)
    w0 = online.weight.detach().clone()
    with torch.no_grad():
        online.weight.add_(1.0)
    enc.update(online)
    torch.testing.assert_close(enc.encoder.weight, 0.9 * w0 + 0.1 * (w0 + 1.0))
    assert not any(p.requires_grad for p in enc.parameters())
    x = torch.randn(4, 3)
    assert enc(x).grad_fn is None


def test_queue_fifo():
    q = DescriptorQueue(2, size=5)
    assert len(q) == 0
    q.enqueue(torch.ones(3, 2), torch.tensor([0, 1, 2]))
    q.enqueue(2 * torch.ones(3, 2), torch.tensor([3, 4, 5]))
    assert len(q) == 5
    assert q.labels.tolist() == [5, 1, 2, 3, 4] and int(q.ptr) == 1
    q.enqueue(torch.zeros(7, 2), torch.arange(10, 17))       # more than size: keep the newest 5
    assert sorted(q.labels.tolist()) == [12, 13, 14, 15, 16]


def test_momentum_contrastive_matches_loop():
    qd, kd = _unit(4, 5, 20), _unit(4, 5, 21)
    y = torch.tensor([0, 1, 0, 2])
    loss_mod = MomentumContrastiveLoss(5, queue_size=6, scale=30.0).double()
    queue_k, queue_y = _unit(3, 5, 22), torch.tensor([1, 0, 7])
    loss_mod.queue.enqueue(queue_k, queue_y)
    loss = loss_mod(qd, kd, y)
    keys = torch.cat([kd, queue_k]).numpy()
    kl = torch.cat([y, queue_y]).numpy()
    ref = []
    for i in range(4):
        lg = 30.0 * keys @ qd[i].numpy()
        lse = math.log(np.exp(lg).sum())
        pos = [j for j in range(len(kl)) if kl[j] == y[i]]
        ref.append(-np.mean([lg[j] - lse for j in pos]))
    assert loss.item() == pytest.approx(float(np.mean(ref)), rel=1e-9)
    assert len(loss_mod.queue) == 6 and loss_mod.queue.labels.tolist()[3:] == [0, 1, 0]
    # gradient reaches the queries only
    qg = qd.clone().requires_grad_(True)
    kg = kd.clone().requires_grad_(True)
    loss_mod.eval()
    loss_mod(qg, kg, y).backward()
    assert qg.grad is not None and kg.grad is None

"""Training losses for global descriptors. Each is a small ``nn.Module`` whose docstring gives its formula.

Notation: ``f`` descriptors [N, D] (normalised inside where the loss needs it), ``y`` integer labels
[N], ``W`` class weights [C, D], ``cos = normalize(f) @ normalize(W).T`` [N, C], ``θ = acos(cos)``.

Pair/tuple losses (contrastive, triplet) take already L2-normalised descriptors, as the models emit.
Margin-softmax heads (ArcFace, CosFace, CurricularFace, MadaCos) hold ``W`` and return the mean
cross-entropy of their margined logits; ``logits(f, y)`` returns those logits.

Distributed training: losses without batch statistics (contrastive, triplet, ArcFace, CosFace) need
nothing special under DDP. MadaCos (batch median), CurricularFace (EMA of the batch mean) and the
momentum queue gather their statistics over all ranks (:mod:`irkit.train.distributed`), so a run on
``k`` ranks matches one process on the concatenated batch.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from irkit.errors import ConfigError
from irkit.train import distributed as D
from irkit.train.miners import batch_hard_triplets

__all__ = [
    "ContrastiveLoss",
    "TripletLoss",
    "unpack_tuples",
    "ArcFace",
    "CosFace",
    "CurricularFace",
    "MadaCos",
    "madacos_scale_margin",
    "JointLoss",
    "MomentumEncoder",
    "DescriptorQueue",
    "MomentumContrastiveLoss",
    "local_triplet_loss",
]


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return x.mean() if x.numel() else x.sum()
    if reduction == "sum":
        return x.sum()
    if reduction == "none":
        return x
    raise ConfigError(f"unknown reduction {reduction!r}: use 'mean', 'sum' or 'none'")


def _check_reduction(reduction: str) -> str:
    if reduction not in ("mean", "sum", "none"):
        raise ConfigError(f"unknown reduction {reduction!r}: use 'mean', 'sum' or 'none'")
    return reduction


# --------------------------------------------------------------------------------------------------
# Pair and tuple losses
# --------------------------------------------------------------------------------------------------
def unpack_tuples(x: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cirtorch's packed tuples -> (query of each pair [P, D], other image [P, D], label [P] 1/0).

    ``x`` [N, D] (one row per image; cirtorch's ``x`` is the transpose), ``label`` [N]: tuples of
    equal size S laid one after the other, each its query (label -1) first, then its images (1 =
    positive, 0 = negative). Every non-query image forms a pair with its tuple's query, in order.
    """
    label = torch.as_tensor(label, device=x.device).reshape(-1)
    if x.dim() != 2 or label.numel() != x.shape[0]:
        raise ConfigError(f"packed tuples need x [N, D] and label [N]; got {tuple(x.shape)} and "
                          f"{tuple(label.shape)}")
    if not bool(((label == -1) | (label == 0) | (label == 1)).all()):
        raise ConfigError("packed tuple labels must be -1 (query), 1 (positive) or 0 (negative)")
    nq = int((label == -1).sum())
    if nq == 0 or x.shape[0] % nq:
        raise ConfigError(f"packed tuples: {x.shape[0]} images do not split into {nq} tuples of equal size")
    size = x.shape[0] // nq
    if size < 2 or not bool((label[::size] == -1).all()):
        raise ConfigError(f"packed tuples: each tuple of {size} images must start with its query (label -1)")
    others = label != -1
    queries = x[::size].repeat_interleave(size - 1, dim=0)
    return queries, x[others], label[others]


class ContrastiveLoss(nn.Module):
    """Contrastive loss in the form of Radenović et al. (cirtorch).

    For a pair (a, b) with distance ``d = ‖a − b‖₂`` and ``t = 1`` for a matching pair, 0 otherwise::

        L(a, b) = t · ½ d²  +  (1 − t) · ½ max(0, margin − d)²

    ``forward(a, b, target)``: a, b [N, D], target [N] (bool or 0/1). Reduction over pairs:
    "mean" (default), "sum" (cirtorch sums over the pairs of a batch) or "none".

    cirtorch conventions, as options: ``layout="packed"`` makes it ``forward(x, label)`` on packed
    tuples (:func:`unpack_tuples`: label -1 query, 1 positive, 0 negative); ``eps_style="difference"``
    computes ``d = ‖a − b + eps‖`` and uses d² in the positive term as cirtorch's
    ``contrastive_loss`` does (default "sqrt": ``d = sqrt(‖a − b‖² + eps)`` in the negative term
    only, the positive term exact). :meth:`cirtorch` sets all of them (packed, sum, eps on the
    difference, margin 0.7, eps 1e-6).
    """

    def __init__(self, margin: float = 0.7, reduction: str = "mean", eps: float = 1e-6, layout: str = "pairs",
                 eps_style: str = "sqrt") -> None:
        super().__init__()
        if margin <= 0:
            raise ConfigError(f"ContrastiveLoss margin must be > 0, got {margin}")
        if layout not in ("pairs", "packed"):
            raise ConfigError(f"ContrastiveLoss layout must be 'pairs' or 'packed', got {layout!r}")
        if eps_style not in ("sqrt", "difference"):
            raise ConfigError(f"ContrastiveLoss eps_style must be 'sqrt' or 'difference', got {eps_style!r}")
        self.margin = float(margin)
        self.reduction = _check_reduction(reduction)
        self.eps = float(eps)
        self.layout, self.eps_style = layout, eps_style

    @classmethod
    def cirtorch(cls, margin: float = 0.7, eps: float = 1e-6) -> "ContrastiveLoss":
        """cirtorch's ``ContrastiveLoss``: packed tuples, sum over pairs, eps added to the difference."""
        return cls(margin=margin, reduction="sum", eps=eps, layout="packed", eps_style="difference")

    def forward(self, a: torch.Tensor, b: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        if self.layout == "packed":
            if target is not None:
                raise ConfigError("ContrastiveLoss(layout='packed') takes forward(x, label)")
            a, b, target = unpack_tuples(a, b)
        elif target is None:
            raise ConfigError("ContrastiveLoss(layout='pairs') takes forward(a, b, target)")
        if a.shape != b.shape or a.dim() != 2 or target.shape != a.shape[:1]:
            raise ConfigError(f"ContrastiveLoss expects a, b [N, D] and target [N]; got {tuple(a.shape)}, "
                              f"{tuple(b.shape)}, {tuple(target.shape)}")
        t = target.to(a.dtype)
        if self.eps_style == "difference":
            d2 = (a - b + self.eps).pow(2).sum(dim=1)
            d = torch.sqrt(d2)
        else:
            d2 = (a - b).pow(2).sum(dim=1)
            # eps inside the sqrt keeps the gradient finite for identical vectors (d=0).
            d = torch.sqrt(d2 + self.eps)
        loss = t * 0.5 * d2 + (1 - t) * 0.5 * F.relu(self.margin - d).pow(2)
        return _reduce(loss, self.reduction)


class TripletLoss(nn.Module):
    """Triplet ranking loss (Gordo et al., METHODS §4).

    With ``d(x, z) = ‖x − z‖²`` when ``squared`` (default) else ``‖x − z‖``::

        L(q, p, n) = coef · max(0, margin + d(q, p) − d(q, n))

    ``coef = ½`` by default (METHODS §4: ``L = ½·max(0, m + |q−p|² − |q−n|²)``, m = 0.1); set
    ``coef=1.0`` for the plain form. ``forward(q, p, n)``: q, p [N, D]; n [N, D] or [N, K, D]
    (K negatives per query: every (q, p, n_k) is one triplet). Reduction over triplets.

    cirtorch conventions, as options: ``layout="packed"`` makes it ``forward(x, label)`` on packed
    tuples (label -1 query, 1 its one positive, 0 negatives; see :func:`unpack_tuples`), each
    negative one triplet; :meth:`cirtorch` sets packed, ``coef=1``, squared distances and sum
    reduction (cirtorch's ``triplet_loss``, margin 0.1).
    """

    def __init__(self, margin: float = 0.1, squared: bool = True, coef: float = 0.5,
                 reduction: str = "mean", eps: float = 1e-12, layout: str = "pairs") -> None:
        super().__init__()
        if margin < 0:
            raise ConfigError(f"TripletLoss margin must be >= 0, got {margin}")
        if layout not in ("pairs", "packed"):
            raise ConfigError(f"TripletLoss layout must be 'pairs' or 'packed', got {layout!r}")
        self.margin = float(margin)
        self.squared = bool(squared)
        self.coef = float(coef)
        self.reduction = _check_reduction(reduction)
        self.eps = float(eps)
        self.layout = layout

    @classmethod
    def cirtorch(cls, margin: float = 0.1) -> "TripletLoss":
        """cirtorch's ``TripletLoss``: packed tuples, coefficient 1, squared distances, sum."""
        return cls(margin=margin, squared=True, coef=1.0, reduction="sum", layout="packed")

    def _packed(self, x: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Packed tuples -> q [nq, D], p [nq, D], n [nq, K, D]; exactly one positive per tuple."""
        q_rep, others, lbl = unpack_tuples(x, label)
        nq = int((torch.as_tensor(label) == -1).sum())
        per = others.shape[0] // nq                     # images per tuple besides the query
        lbl = lbl.reshape(nq, per)
        if not bool(((lbl == 1).sum(dim=1) == 1).all()) or per < 2:
            raise ConfigError("packed triplet tuples need exactly one positive (label 1) and at least one "
                              "negative (label 0) each")
        others = others.reshape(nq, per, -1)
        pos = others[lbl == 1]
        neg = others[lbl == 0].reshape(nq, per - 1, -1)
        return q_rep.reshape(nq, per, -1)[:, 0], pos, neg

    def _dist(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        d2 = (x - z).pow(2).sum(dim=-1)
        return d2 if self.squared else torch.sqrt(d2 + self.eps)

    def forward(self, q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None = None) -> torch.Tensor:
        if self.layout == "packed":
            if n is not None:
                raise ConfigError("TripletLoss(layout='packed') takes forward(x, label)")
            q, p, n = self._packed(q, p)
        elif n is None:
            raise ConfigError("TripletLoss(layout='pairs') takes forward(q, p, n)")
        if q.shape != p.shape or q.dim() != 2:
            raise ConfigError(f"TripletLoss expects q, p [N, D]; got {tuple(q.shape)}, {tuple(p.shape)}")
        if n.dim() == 2:
            n = n.unsqueeze(1)
        if n.dim() != 3 or n.shape[0] != q.shape[0] or n.shape[2] != q.shape[1]:
            raise ConfigError(f"TripletLoss expects n [N, D] or [N, K, D]; got {tuple(n.shape)}")
        dp = self._dist(q, p).unsqueeze(1)              # [N, 1]
        dn = self._dist(q.unsqueeze(1), n)              # [N, K]
        loss = self.coef * F.relu(self.margin + dp - dn)
        return _reduce(loss.reshape(-1), self.reduction)


# --------------------------------------------------------------------------------------------------
# Margin-softmax heads
# --------------------------------------------------------------------------------------------------
class _CosineHead(nn.Module):
    """Holds the class weights ``W`` [C, D] and computes ``cos = normalize(f) normalize(W)^T``."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        if in_features <= 0 or num_classes <= 1:
            raise ConfigError(f"a margin head needs in_features > 0 and num_classes > 1; got "
                              f"{in_features}, {num_classes}")
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, f: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(f, dim=1), F.normalize(self.weight, dim=1))

    def _check(self, f: torch.Tensor, y: torch.Tensor) -> None:
        if f.dim() != 2 or f.shape[1] != self.in_features or y.shape != f.shape[:1]:
            raise ConfigError(f"{type(self).__name__} expects f [N, {self.in_features}] and labels [N]; "
                              f"got {tuple(f.shape)} and {tuple(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ConfigError(f"{type(self).__name__}: labels must lie in [0, {self.num_classes}); got "
                              f"range [{int(y.min())}, {int(y.max())}]")

    def logits(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(f, y), y)


def _arc_target(cos_t: torch.Tensor, m: float) -> torch.Tensor:
    """``cos(θ + m)`` where ``θ + m ≤ π``, else the monotone continuation ``cos θ − m·sin m``."""
    sin_t = torch.sqrt((1.0 - cos_t.pow(2)).clamp(min=0.0))
    phi = cos_t * math.cos(m) - sin_t * math.sin(m)
    return torch.where(cos_t > math.cos(math.pi - m), phi, cos_t - m * math.sin(m))


class ArcFace(_CosineHead):
    """ArcFace (additive angular margin) head.

    Logits: ``s·cos θ_j`` for ``j ≠ y`` and ``s·cos(θ_y + m)`` for the target, where ``θ_y + m ≤ π``;
    beyond that the target logit is ``s·(cos θ_y − m·sin m)`` (keeps it monotone in θ_y, as the
    reference implementation does). Loss: mean cross-entropy.
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 64.0, margin: float = 0.5) -> None:
        super().__init__(in_features, num_classes)
        self.scale, self.margin = float(scale), float(margin)

    def logits(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._check(f, y)
        cos = self.cosine(f)
        onehot = F.one_hot(y, self.num_classes).bool()
        return self.scale * torch.where(onehot, _arc_target(cos, self.margin), cos)


class CosFace(_CosineHead):
    """CosFace / normalised softmax with an additive cosine margin.

    Logits: ``s·cos θ_j`` for ``j ≠ y`` and ``s·(cos θ_y − m)`` for the target; mean cross-entropy.
    ``margin=0`` gives the plain normalised-softmax loss.
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 30.0, margin: float = 0.35) -> None:
        super().__init__(in_features, num_classes)
        self.scale, self.margin = float(scale), float(margin)

    def logits(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._check(f, y)
        cos = self.cosine(f)
        onehot = F.one_hot(y, self.num_classes).to(cos.dtype)
        return self.scale * (cos - self.margin * onehot)


class CurricularFace(_CosineHead):
    """CurricularFace head (Huang et al., 2020), the margin loss of CVNet-Global.

    Target logit ``s·T(cos θ_y)`` with ``T = cos(θ_y + m)`` (ArcFace, same continuation beyond π).
    Non-target logit ``s·N(t, cos θ_j)`` where::

        N(t, cos θ_j) = cos θ_j                 if T(cos θ_y) ≥ cos θ_j   (easy negative)
                      = cos θ_j · (t + cos θ_j) otherwise                  (hard negative)

    The adaptive ``t`` (buffer, init 0) is an EMA of the mean target cosine, updated in training
    before the logits are formed: ``t ← (1 − α)·t + α·mean_i cos θ_{y_i}`` with momentum α = 0.01;
    the mean is over the global batch under DDP. ``t`` and the hard-negative mask carry no gradient.
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 64.0, margin: float = 0.5,
                 momentum: float = 0.01) -> None:
        super().__init__(in_features, num_classes)
        self.scale, self.margin, self.momentum = float(scale), float(margin), float(momentum)
        self.register_buffer("t", torch.zeros(()))

    def logits(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._check(f, y)
        cos = self.cosine(f)
        cos_y = cos.gather(1, y[:, None])                        # [N, 1]
        target = _arc_target(cos_y, self.margin)                 # [N, 1]
        if self.training:
            with torch.no_grad():
                n_cnt = torch.tensor([float(cos_y.numel())], device=cos.device, dtype=cos.dtype)
                tot = torch.stack([cos_y.detach().sum().reshape(1), n_cnt]).reshape(1, 2)
                tot = D.all_gather_nograd(tot).sum(dim=0)
                mean = tot[0] / tot[1].clamp(min=1.0)
                self.t.mul_(1.0 - self.momentum).add_(self.momentum * mean.to(self.t.dtype))
        hard = cos > target.detach()
        t = self.t.to(cos.dtype)
        out = torch.where(hard, cos * (t + cos), cos)
        out = out.scatter(1, y[:, None], target)
        return self.scale * out


# --------------------------------------------------------------------------------------------------
# MadaCos
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def madacos_scale_margin(cos: torch.Tensor, y: torch.Tensor, alpha: float | None = None, s_min: float = 32.0,
                         big: float = 9999999.0, training: bool = True, *,
                         a: float | None = None) -> tuple[float, float, float]:
    """Adaptive scale and margin of MadaCos (CFCD, METHODS §3), computed over the GLOBAL batch.

    ``med`` = median of the target cosines ``cos[i, y_i]`` of the global batch (all ranks
    gathered, rank order). For an even count the **lower median** is used (``torch.median``); its
    sample is the one ``torch.median`` returns the index of — the "median sample" ``i*``::

        s = max(s_min, ln(big·(1 − α)/α) / (1 − med))
        B = Σ_{j ≠ y_i*} exp(s · cos[i*, j])          (computed as a log-sum-exp)
        m = max(0, med − ln(B · α/(1 − α)) / s)       (m = 0 when not training)

    Then the median sample's target probability under logits ``s·cos`` / ``s·(cos_y − m)`` is
    exactly ``alpha`` (α, the paper's name, default 0.02; ``a`` is an alias) when m is not clipped at 0. Returns
    floats ``(s, m, med)``; no gradient.
    """
    a = _madacos_alpha(alpha, a, default=0.02)
    cos = cos.detach()
    if cos.dtype in (torch.float16, torch.bfloat16):
        cos = cos.float()
    cos_y = cos.gather(1, y[:, None]).squeeze(1)                                     # [n]
    all_cos_y = D.all_gather_nograd(cos_y)
    if all_cos_y.numel() == 0:
        raise ConfigError("MadaCos needs a non-empty batch")
    med_t, idx_t = torch.median(all_cos_y, dim=0)
    med, idx = float(med_t), int(idx_t)
    s = max(float(s_min), math.log(big * (1.0 - a) / a) / max(1.0 - med, 1e-12))
    if not training:
        return s, 0.0, med
    # ln B for every local sample at this s, gathered so that any rank can read the median sample's.
    nontarget = cos.scatter(1, y[:, None], float("-inf"))
    ln_b = torch.logsumexp(s * nontarget, dim=1)                                      # [n]
    ln_b_all = D.all_gather_nograd(ln_b)
    ln_b_med = float(ln_b_all[idx])
    m = max(0.0, med - (ln_b_med + math.log(a / (1.0 - a))) / s)
    return s, m, med


def _madacos_alpha(alpha: float | None, a: float | None, default: float) -> float:
    """MadaCos' target probability from ``alpha`` (the paper's name) or its alias ``a``."""
    if a is not None and alpha is not None and float(a) != float(alpha):
        raise ConfigError(f"MadaCos: alpha={alpha} and its alias a={a} disagree; give one of them")
    value = float(a if a is not None else (default if alpha is None else alpha))
    if not 0.0 < value < 1.0:
        raise ConfigError(f"MadaCos target probability alpha must lie in (0, 1), got {value}")
    return value


class MadaCos(_CosineHead):
    """MadaCos: CosFace-style loss with an adaptive scale and margin (CFCD, METHODS §3).

    ``alpha``: the target probability of the median sample (the paper's α; ``a`` is accepted as
    an alias, and ``self.a`` reads it).

    ``cos = normalize(f)·normalize(W)^T``; ``(s, m)`` from :func:`madacos_scale_margin` (batch
    median of the target cosines, global under DDP; lower median for even batches; m = 0 in eval).
    Logits ``s·cos_j`` (non-target) and ``s·(cos_y − m)`` (target); mean cross-entropy. ``s`` and
    ``m`` are constants for the gradient: gradients flow only through ``cos``. The values of the
    last call are kept in ``last_s``, ``last_m`` and ``last_median`` (floats).
    """

    def __init__(self, in_features: int, num_classes: int, alpha: float | None = None, s_min: float = 32.0,
                 big: float = 9999999.0, *, a: float | None = None) -> None:
        super().__init__(in_features, num_classes)
        self.alpha = _madacos_alpha(alpha, a, default=0.02)
        self.s_min, self.big = float(s_min), float(big)
        self.last_s: float = float("nan")
        self.last_m: float = float("nan")
        self.last_median: float = float("nan")

    def logits_from_cos(self, cos: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """MadaCos logits for given cosines [N, C] (updates ``last_s``/``last_m``)."""
        s, m, med = madacos_scale_margin(cos, y, self.alpha, self.s_min, self.big, self.training)
        self.last_s, self.last_m, self.last_median = s, m, med
        onehot = F.one_hot(y, cos.shape[1]).to(cos.dtype)
        return s * (cos - m * onehot)

    @property
    def a(self) -> float:
        """Alias of :attr:`alpha` (irkit's earlier name)."""
        return self.alpha

    def logits(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._check(f, y)
        return self.logits_from_cos(self.cosine(f), y)


# --------------------------------------------------------------------------------------------------
# Joint classification + ranking loss
# --------------------------------------------------------------------------------------------------
class JointLoss(nn.Module):
    """Classification (CosFace / normalised softmax) + ranking (in-batch triplet or contrastive)
    with a learnable balance (homoscedastic-uncertainty weighting, Kendall et al. 2018)::

        L = exp(−w₁)·L_cls + exp(−w₂)·L_rank + w₁ + w₂,     w_i clamped to [−w_max, w_max]

    ``L_cls`` = :class:`CosFace` on ``f`` (``margin=0`` gives the normalised softmax), ``L_rank`` =
    :class:`TripletLoss` on the batch-hard triplets of the batch, or :class:`ContrastiveLoss` over
    all in-batch pairs. ``w₁, w₂`` are ``nn.Parameter`` (init ``init_w``) trained with the model.

    Why it cannot collapse: a term's weight ``exp(−w)`` is never 0, and lowering a weight means
    raising ``w``, which the ``+w`` term charges linearly; for fixed ``L_i > 0`` the optimum is
    ``w_i = ln L_i``, i.e. the weight becomes ``1/L_i`` — each term stays in the objective with a
    weight inversely proportional to its own size, so neither can be switched off. The only
    degenerate direction is ``L_i → 0`` (a triplet loss with every margin met), where ``w_i → −∞``
    would make the weight explode and ``L`` unbounded below; the clamp to ``[−w_max, w_max]``
    removes it: ``L ≥ −2·w_max`` and every weight stays in ``[e^{−w_max}, e^{w_max}]``.
    ``last`` holds the detached parts of the last call.
    """

    def __init__(self, in_features: int, num_classes: int, rank: str = "triplet", cls_scale: float = 30.0,
                 cls_margin: float = 0.0, rank_margin: float | None = None, init_w: tuple[float, float] = (0.0, 0.0),
                 w_max: float = 4.0) -> None:
        super().__init__()
        self.cls = CosFace(in_features, num_classes, scale=cls_scale, margin=cls_margin)
        if rank == "triplet":
            self.rank: nn.Module = TripletLoss(margin=0.1 if rank_margin is None else rank_margin)
        elif rank == "contrastive":
            self.rank = ContrastiveLoss(margin=0.7 if rank_margin is None else rank_margin)
        else:
            raise ConfigError(f"JointLoss rank={rank!r}: use 'triplet' or 'contrastive'")
        self.rank_kind = rank
        if w_max <= 0:
            raise ConfigError(f"JointLoss w_max must be > 0, got {w_max}")
        self.w_max = float(w_max)
        self.w = nn.Parameter(torch.tensor([float(init_w[0]), float(init_w[1])]))
        self.last: dict[str, float] = {}

    def combine(self, l_cls: torch.Tensor, l_rank: torch.Tensor) -> torch.Tensor:
        """The learnable balance applied to two scalar losses (usable with any pair of losses)."""
        w = self.w.clamp(-self.w_max, self.w_max)
        return torch.exp(-w[0]) * l_cls + torch.exp(-w[1]) * l_rank + w[0] + w[1]

    def ranking_loss(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fn = F.normalize(f, dim=1)
        if self.rank_kind == "triplet":
            a, p, n = batch_hard_triplets(fn, y)
            if a.numel() == 0:
                return fn.sum() * 0.0
            return self.rank(fn[a], fn[p], fn[n])
        i, j = torch.triu_indices(len(y), len(y), offset=1, device=f.device)
        return self.rank(fn[i], fn[j], y[i] == y[j])

    def forward(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        l_cls = self.cls(f, y)
        l_rank = self.ranking_loss(f, y)
        out = self.combine(l_cls, l_rank)
        self.last = {"cls": float(l_cls.detach()), "rank": float(l_rank.detach()),
                     "w_cls": float(self.w[0].detach()), "w_rank": float(self.w[1].detach())}
        return out


# --------------------------------------------------------------------------------------------------
# Momentum contrast (CVNet-Global)
# --------------------------------------------------------------------------------------------------
def _unwrap(module: nn.Module) -> nn.Module:
    """The wrapped module of a DDP / DataParallel wrapper, else the module itself."""
    if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return module.module
    return module


class MomentumEncoder(nn.Module):
    """A frozen copy of a module updated as an exponential moving average of the online module::

        θ_k ← μ·θ_k + (1 − μ)·θ_q      (μ = momentum, 0.999 by default)

    Buffers (e.g. BatchNorm statistics) are copied from the online module. ``forward`` runs the
    copy under ``torch.no_grad``. ``update(online)`` accepts a DDP-wrapped module too.
    """

    def __init__(self, module: nn.Module, momentum: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ConfigError(f"MomentumEncoder momentum must lie in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.encoder = copy.deepcopy(_unwrap(module))
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, online: nn.Module) -> None:
        online = _unwrap(online)
        for pk, pq in zip(self.encoder.parameters(), online.parameters()):
            pk.mul_(self.momentum).add_(pq.detach(), alpha=1.0 - self.momentum)
        for bk, bq in zip(self.encoder.buffers(), online.buffers()):
            bk.copy_(bq)

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        return self.encoder(*args, **kwargs)


class DescriptorQueue(nn.Module):
    """FIFO queue of ``size`` descriptors [size, dim] with their labels (buffers; empty slots have
    label −1). ``enqueue(keys, labels)`` gathers keys and labels of all ranks (rank order) first, so
    every rank holds the same queue; the oldest entries are overwritten (dequeue).
    """

    def __init__(self, dim: int, size: int = 8192) -> None:
        super().__init__()
        if dim <= 0 or size <= 0:
            raise ConfigError(f"DescriptorQueue needs dim > 0 and size > 0; got {dim}, {size}")
        self.dim, self.size = int(dim), int(size)
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def valid(self) -> torch.Tensor:
        return self.labels >= 0

    def __len__(self) -> int:
        return int(self.valid.sum())

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        keys = D.all_gather_nograd(keys.detach().to(self.keys.dtype))
        labels = D.all_gather_nograd(labels.detach().long())
        if keys.shape[0] > self.size:                     # keep only the newest `size`
            keys, labels = keys[-self.size:], labels[-self.size:]
        n = keys.shape[0]
        idx = (int(self.ptr) + torch.arange(n, device=self.keys.device)) % self.size
        self.keys[idx] = keys
        self.labels[idx] = labels
        self.ptr.fill_((int(self.ptr) + n) % self.size)


class MomentumContrastiveLoss(nn.Module):
    """Label-aware InfoNCE of query descriptors against momentum keys (CVNet-Global, MoCo style).

    Keys ``K`` = the momentum-encoder descriptors of the current global batch (all ranks) followed
    by the valid entries of the queue; ``P(i) = {k ∈ K : label(k) = y_i}`` (supervised-contrastive
    positives; the image's own key is always one). With ``s = scale`` (30, i.e. temperature 1/30)::

        L_i = −(1/|P(i)|) Σ_{p ∈ P(i)} log( exp(s·q_i·k_p) / Σ_{k ∈ K} exp(s·q_i·k) ),   L = mean_i L_i

    Queries and keys are L2-normalised inside. In training, after the loss, the batch keys are
    enqueued (all-gathered). METHODS §2 marks scale 30 / queue 8192 / momentum 0.999 unverified,
    hence configurable.
    """

    def __init__(self, dim: int, queue_size: int = 8192, scale: float = 30.0) -> None:
        super().__init__()
        self.scale = float(scale)
        self.queue = DescriptorQueue(dim, queue_size)

    def forward(self, q: torch.Tensor, k: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if q.shape != k.shape or q.dim() != 2 or y.shape != q.shape[:1] or q.shape[1] != self.queue.dim:
            raise ConfigError(f"MomentumContrastiveLoss expects q, k [N, {self.queue.dim}] and labels [N]; "
                              f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(y.shape)}")
        qn = F.normalize(q, dim=1)
        kn = F.normalize(k.detach(), dim=1)
        k_batch = D.all_gather_nograd(kn)
        y_batch = D.all_gather_nograd(y)
        valid = self.queue.valid
        keys = torch.cat([k_batch, self.queue.keys[valid].to(kn.dtype)], dim=0)
        key_labels = torch.cat([y_batch, self.queue.labels[valid]], dim=0)
        logits = self.scale * qn @ keys.T                                   # [N, |K|]
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        pos = (y[:, None] == key_labels[None, :]).to(log_prob.dtype)
        loss = -(pos * log_prob).sum(dim=1) / pos.sum(dim=1).clamp(min=1.0)
        if self.training:
            self.queue.enqueue(kn, y)
        return loss.mean()


# --------------------------------------------------------------------------------------------------
# CFCD local triplet
# --------------------------------------------------------------------------------------------------
def local_triplet_loss(fa: torch.Tensor, fp: torch.Tensor, negatives: torch.Tensor, ratio: float = 0.9,
                       top_frac: float = 0.5, margin: float = 0.1) -> tuple[torch.Tensor, int]:
    """CFCD's local loss for one tuple (METHODS §3).

    ``fa``, ``fp`` [C, h, w] stage-4 maps of anchor and positive, ``negatives`` [K, C, h, w].
    Local descriptors are the L2-normalised positions; attention is each position's L1 norm.
    Matches: mutual nearest neighbours anchor<->positive passing the ratio test (nearest /
    second-nearest distance < ``ratio``), kept where the positive position is in the top
    ``top_frac`` of the positive's attention. For each match, each negative image's nearest
    descriptor to the anchor descriptor is its hard negative; triplet on squared L2 with ``margin``.
    Returns (mean loss over all (match, negative) triplets, number of matches).
    """
    c = fa.shape[0]
    a = F.normalize(fa.reshape(c, -1).T.float(), dim=1)                  # [Na, C]
    p = F.normalize(fp.reshape(c, -1).T.float(), dim=1)                  # [Np, C]
    att_p = fp.reshape(c, -1).abs().sum(0).detach()                      # [Np]
    with torch.no_grad():
        d = torch.cdist(a, p)                                            # [Na, Np]
        two = d.topk(min(2, d.shape[1]), dim=1, largest=False)
        nn_ap = two.indices[:, 0]
        nn_pa = d.argmin(0)
        mutual = nn_pa[nn_ap] == torch.arange(a.shape[0], device=a.device)
        ratio_ok = (two.values[:, 0] < ratio * two.values[:, 1]) if d.shape[1] > 1 else torch.ones_like(mutual)
        k = max(1, int(round(top_frac * att_p.numel())))
        strong = torch.zeros_like(att_p, dtype=torch.bool)
        strong[att_p.topk(k).indices] = True
        keep = mutual & ratio_ok & strong[nn_ap]
    ia = torch.nonzero(keep).squeeze(1)
    if ia.numel() == 0:
        return fa.sum() * 0.0, 0
    ip = nn_ap[ia]
    qa, qp = a[ia], p[ip]                                                # [M, C]
    negs = F.normalize(negatives.reshape(negatives.shape[0], c, -1).transpose(1, 2).float(), dim=2)  # [K, Nn, C]
    with torch.no_grad():
        dn_all = torch.cdist(qa.unsqueeze(0).expand(negs.shape[0], -1, -1), negs)   # [K, M, Nn]
        hard = dn_all.argmin(2)                                                      # [K, M]
    qn = torch.stack([negs[j][hard[j]] for j in range(negs.shape[0])], 1)            # [M, K, C]
    dp = (qa - qp).pow(2).sum(-1, keepdim=True)                                      # [M, 1]
    dn = (qa.unsqueeze(1) - qn).pow(2).sum(-1)                                       # [M, K]
    return F.relu(margin + dp - dn).mean(), int(ia.numel())

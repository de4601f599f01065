"""Center-pivot 4D convolution (HSNet, used by CVNet's correlation encoder).

A 4D tensor ``x [B, C, ha, wa, hb, wb]`` (query dims ``a``, key dims ``b``) is convolved with a 4D
kernel that is zero everywhere except on the "pivot cross" through its centre: one 2D kernel over
the query dims (at the key-dims centre) plus one 2D kernel over the key dims (at the query-dims
centre). That costs two 2D convolutions instead of one full 4D one.

Stride ``s`` applies to all four dims, which is what makes the two halves line up: the query-dims
convolution (stride ``s`` over ``ha, wa``) is evaluated only at the key positions ``0, s, 2s, ...``
and the key-dims convolution (stride ``s`` over ``hb, wb``) only at the query positions
``0, s, 2s, ...``. With an odd kernel and padding ``k // 2`` both give ``ceil(n / s)`` outputs per
dim. (The official CVNet code reaches the same result by index-selecting the key positions before
the first convolution and the query positions before the second.)

:func:`center_pivot_conv4d` is the fast form (two batched ``conv2d`` calls, no loops over
positions); :func:`conv4d_reference` computes the same sum by explicit kernel offsets and is used
only by tests and benchmarks.

:func:`center_pivot_conv4d_cl` is the layout-preserving form used by CVNet's encoder on CPU: the
tensor lives channels-last, ``[B, ha, wa, hb, wb, C]``. Then the key-dims half is a plain NHWC
``conv2d`` over a *view* (rows = query positions, no copy at stride 1) whose output is already in
the same layout, only the query-dims half needs one transposed copy in and out, and oneDNN runs
both convolutions in its fast channels-last kernels (about 2x the NCHW ones at 16-32 channels).
:func:`group_norm_cl` is GroupNorm on that layout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CenterPivotConv4d", "center_pivot_conv4d", "center_pivot_conv4d_cl", "conv4d_reference",
           "group_norm_cl", "to_channels_last_4d", "from_channels_last_4d"]


def _check(x: Tensor, weight_q: Tensor, weight_k: Tensor) -> None:
    if x.dim() != 6:
        raise ValueError(f"conv4d expects [B, C, ha, wa, hb, wb], got shape {tuple(x.shape)}")
    for w in (weight_q, weight_k):
        if w.dim() != 4 or w.shape[-1] != w.shape[-2] or w.shape[-1] % 2 == 0:
            raise ValueError(f"conv4d weights must be [O, C, k, k] with odd k, got {tuple(w.shape)}")


def center_pivot_conv4d(x: Tensor, weight_q: Tensor, bias_q: Tensor | None, weight_k: Tensor,
                        bias_k: Tensor | None, stride: int = 1) -> Tensor:
    """Center-pivot 4D convolution of ``x [B, C, ha, wa, hb, wb]``.

    ``weight_q [O, C, k, k]`` convolves the query dims (ha, wa), ``weight_k`` the key dims (hb, wb);
    padding ``k // 2``; stride ``stride`` on all four dims. Returns a contiguous
    ``[B, O, ceil(ha/s), ceil(wa/s), ceil(hb/s), ceil(wb/s)]``.
    """
    _check(x, weight_q, weight_k)
    s = int(stride)
    bsz, ch, ha, wa, hb, wb = x.shape
    # query-dims conv at the strided key positions: rows = (b, key position)
    xk = x[..., ::s, ::s] if s > 1 else x
    hb2, wb2 = xk.shape[-2:]
    rows = xk.permute(0, 4, 5, 1, 2, 3).reshape(bsz * hb2 * wb2, ch, ha, wa)
    out_q = F.conv2d(rows, weight_q, bias_q, stride=s, padding=weight_q.shape[-1] // 2)
    och, ha2, wa2 = out_q.shape[1:]
    out_q = out_q.view(bsz, hb2, wb2, och, ha2, wa2)
    del rows  # free each temporary as soon as possible: these tensors are the peak memory
    # key-dims conv at the strided query positions: rows = (b, query position)
    xq = x[:, :, ::s, ::s] if s > 1 else x
    rows = xq.permute(0, 2, 3, 1, 4, 5).reshape(bsz * ha2 * wa2, ch, hb, wb)
    out_k = F.conv2d(rows, weight_k, bias_k, stride=s, padding=weight_k.shape[-1] // 2)
    del rows
    out = out_k.view(bsz, ha2, wa2, och, hb2, wb2).permute(0, 3, 1, 2, 4, 5).contiguous()
    del out_k
    out += out_q.permute(0, 3, 4, 5, 1, 2)
    return out


def to_channels_last_4d(x: Tensor) -> Tensor:
    """``[B, C, ha, wa, hb, wb]`` -> contiguous ``[B, ha, wa, hb, wb, C]``."""
    return x.permute(0, 2, 3, 4, 5, 1).contiguous()


def from_channels_last_4d(x: Tensor) -> Tensor:
    """``[B, ha, wa, hb, wb, C]`` -> contiguous ``[B, C, ha, wa, hb, wb]``."""
    return x.permute(0, 5, 1, 2, 3, 4).contiguous()


def _nhwc_conv(rows: Tensor, weight: Tensor, bias: Tensor | None, stride: int) -> Tensor:
    """``rows [N, H, W, C]`` (contiguous) -> ``[N, H', W', O]`` through an NHWC conv2d (views only)."""
    x = rows.permute(0, 3, 1, 2)  # a channels_last NCHW view of the same memory
    y = F.conv2d(x, weight.contiguous(memory_format=torch.channels_last), bias, stride=stride,
                 padding=weight.shape[-1] // 2)
    return y.permute(0, 2, 3, 1)  # contiguous when oneDNN kept channels_last (it does on CPU)


def center_pivot_conv4d_cl(x: Tensor, weight_q: Tensor, bias_q: Tensor | None, weight_k: Tensor,
                           bias_k: Tensor | None, stride: int = 1) -> Tensor:
    """:func:`center_pivot_conv4d` on the channels-last layout: ``x [B, ha, wa, hb, wb, C]`` ->
    contiguous ``[B, ha', wa', hb', wb', O]`` (same numbers, permuted)."""
    if x.dim() != 6:
        raise ValueError(f"conv4d (channels-last) expects [B, ha, wa, hb, wb, C], got shape {tuple(x.shape)}")
    _check(x.permute(0, 5, 1, 2, 3, 4), weight_q, weight_k)
    s = int(stride)
    bsz, ha, wa, hb, wb, ch = x.shape
    # key-dims conv at the strided query positions: rows = (b, query position), a view at stride 1
    xq = x[:, ::s, ::s] if s > 1 else x
    ha2, wa2 = xq.shape[1:3]
    out = _nhwc_conv(xq.reshape(bsz * ha2 * wa2, hb, wb, ch), weight_k, bias_k, s)
    hb2, wb2, och = out.shape[1:]
    out = out.reshape(bsz, ha2, wa2, hb2, wb2, och)
    if not out.is_contiguous():
        out = out.contiguous()
    # query-dims conv at the strided key positions: rows = (b, key position), one transposed copy
    xk = x[:, :, :, ::s, ::s] if s > 1 else x
    rows = xk.permute(0, 3, 4, 1, 2, 5).reshape(bsz * hb2 * wb2, ha, wa, ch)
    yq = _nhwc_conv(rows, weight_q, bias_q, s)
    del rows
    out += yq.reshape(bsz, hb2, wb2, ha2, wa2, och).permute(0, 3, 4, 1, 2, 5)
    return out


def group_norm_cl(x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None,
                  eps: float = 1e-5, relu: bool = False) -> Tensor:
    """``nn.GroupNorm`` (then ReLU with ``relu``) over the channels of a contiguous channels-last
    ``[B, ..., C]`` tensor, IN PLACE. Two passes (mean, then the centred second moment as the
    diagonal of a small Gram matrix): torch's channels-last group_norm kernel loses ~1e-3 on large
    4D tensors (E[x^2] - E[x]^2 in fp32), and ``var_mean`` over a strided view is 4x slower."""
    bsz, ch = x.shape[0], x.shape[-1]
    per = ch // groups
    flat = x.view(bsz, -1, ch)
    n = flat.shape[1] * per
    ones = flat.new_ones(bsz, 1, flat.shape[1])
    mean = torch.bmm(ones, flat).view(bsz, groups, per).sum(-1, keepdim=True) / n       # [B, G, 1]
    flat.sub_(mean.expand(bsz, groups, per).reshape(bsz, 1, ch))
    sq = torch.diagonal(torch.bmm(flat.transpose(1, 2), flat), dim1=1, dim2=2)            # [B, C]
    var = sq.reshape(bsz, groups, per).sum(-1, keepdim=True) / n
    scale = torch.rsqrt(var + eps).expand(bsz, groups, per).reshape(bsz, 1, ch)
    if weight is not None:
        scale = scale * weight
    if bias is not None:
        torch.addcmul(bias.view(1, 1, ch).expand(bsz, 1, ch), flat, scale, out=flat)
    else:
        flat.mul_(scale)
    if relu:
        flat.clamp_(min=0)
    return x


def conv4d_reference(x: Tensor, weight_q: Tensor, bias_q: Tensor | None, weight_k: Tensor,
                     bias_k: Tensor | None, stride: int = 1) -> Tensor:
    """The same operation written as the plain definition, for tests and benchmarks.

    ``y[b,o,i,j,k,l] = sum_{c,u,v} Wq[o,c,u,v] x[b,c,i*s+u-p, j*s+v-p, k*s, l*s]
                     + sum_{c,u,v} Wk[o,c,u,v] x[b,c,i*s, j*s, k*s+u-p, l*s+v-p] + bq[o] + bk[o]``
    with zeros outside ``x``: one loop over kernel offsets, no ``conv2d``.
    """
    _check(x, weight_q, weight_k)
    s = int(stride)
    k = weight_q.shape[-1]
    p = k // 2
    bsz, ch, ha, wa, hb, wb = x.shape
    oa, ob, oc, od = ((n - 1) // s + 1 for n in (ha, wa, hb, wb))
    xp = F.pad(x, (p, p, p, p, p, p, p, p))

    def span(start: int, n: int) -> slice:
        return slice(start, start + s * (n - 1) + 1, s)

    out = x.new_zeros(bsz, weight_q.shape[0], oa, ob, oc, od)
    for u in range(k):
        for v in range(k):
            patch_q = xp[:, :, span(u, oa), span(v, ob), span(p, oc), span(p, od)]
            out += torch.einsum("oc,bcijkl->boijkl", weight_q[:, :, u, v], patch_q)
            patch_k = xp[:, :, span(p, oa), span(p, ob), span(u, oc), span(v, od)]
            out += torch.einsum("oc,bcijkl->boijkl", weight_k[:, :, u, v], patch_k)
    for bias in (bias_q, bias_k):
        if bias is not None:
            out += bias.view(1, -1, 1, 1, 1, 1)
    return out


class CenterPivotConv4d(nn.Module):
    """Module form; ``conv1`` acts on the query dims, ``conv2`` on the key dims (the parameter names
    of the published CVNet/HSNet checkpoints)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 bias: bool = True) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"center-pivot conv4d needs an odd kernel size, got {kernel_size}")
        self.stride = int(stride)
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=pad, bias=bias)
        self.conv2 = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=pad, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return center_pivot_conv4d(x, self.conv1.weight, self.conv1.bias, self.conv2.weight,
                                   self.conv2.bias, self.stride)

    def forward_cl(self, x: Tensor) -> Tensor:
        """On the channels-last layout ``[B, ha, wa, hb, wb, C]`` (see :func:`center_pivot_conv4d_cl`)."""
        return center_pivot_conv4d_cl(x, self.conv1.weight, self.conv1.bias, self.conv2.weight,
                                      self.conv2.bias, self.stride)

    def forward_reference(self, x: Tensor) -> Tensor:
        return conv4d_reference(x, self.conv1.weight, self.conv1.bias, self.conv2.weight,
                                self.conv2.bias, self.stride)

    def extra_repr(self) -> str:
        return f"stride={self.stride}"

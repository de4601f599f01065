"""CVNet (Lee et al., CVPR 2022): a global ResNet+GeM descriptor and a correlation-verification
re-ranker, in one module so that one published checkpoint loads strictly.

Layout of the irkit module (``CVNet``) and how the published keys map onto it:

====================================  =====================================================
published (``model_state``)           irkit
====================================  =====================================================
``encoder_q.<pycls backbone key>``    ``backbone.<torchvision key>`` (see resnet.py)
``encoder_q.head.pool.p``             ``pool.p``
``encoder_q.head.fc.{weight,bias}``   ``fc.{weight,bias}``
``conv2ds.*``, ``cv_learner.*``       ``reranker.conv2ds.*``, ``reranker.cv_learner.*``
====================================  =====================================================

The re-ranker is split into :meth:`CVNetReranker.prepare` (feature pyramid + projection +
normalisation, done ONCE per image: extraction stores these levels, packed, see
:meth:`CVNetReranker.pack`) and :meth:`CVNetReranker.score` (correlation + 4D encoder, batched over
candidates). ``score`` never materialises the full 4D correlation [9, hq, wq, hk, wk] (324 MiB for
a 1024x768 pair): the first center-pivot layer (stride 2) only reads it at strided key positions
(its query-dims conv) and at strided query positions (its key-dims conv). Each half is ONE matmul
per chunk of pivots, pivot vectors against every level resized to the full level size (resizing is
linear, so correlating resized features equals resizing their correlation, as the published code
does), whose output is already the conv's NCHW input. The rest of the encoder runs channels-last
in place (:func:`irkit.nn.conv4d.center_pivot_conv4d_cl`). All in float32: bfloat16 in the first
layer moved scores by 1.2e-4, in the later layers by 2.6e-4 (parity checkpoint, 1024x768 minidev
pairs), beyond the 1e-4 kept against the published route. :meth:`CVNetReranker.correlation` +
:meth:`CVNetReranker.forward_reference` keep the published order of operations (full tensor) for
tests, benchmarks and pictures.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from irkit.errors import ConfigError
from irkit.io.images import InputSpec
from irkit.models.base import GlobalModel
from irkit.models.registry import Preset, register_preset
from irkit.nn.backbones.resnet import ResNet, pycls_key_to_torchvision, torchvision_key_to_pycls
from irkit.nn.conv4d import CenterPivotConv4d, from_channels_last_4d, group_norm_cl
from irkit.nn.pooling import GeM

log = logging.getLogger(__name__)

__all__ = ["CVNET_INPUT_SPEC", "Expanded", "CVNetGlobal", "CVNetReranker", "CVLearner", "CVNet", "branch_size",
           "official_to_irkit", "irkit_to_official"]

#: pixel convention of the published weights: BGR, /255, mean/std listed in BGR order
CVNET_INPUT_SPEC = InputSpec(channel_order="BGR", mean=(0.406, 0.456, 0.485), std=(0.225, 0.224, 0.229),
                             max_side=None, interp_down="area", interp_up="linear")
PYRAMID_SCALES = (0.25, 0.5, 1.0)  # area scales of the correlation pyramid
COSINE_EPS = 1e-8


# ------------------------------------------------------------------------------------ global model

class CVNetGlobal(GlobalModel):
    """ResNet-50/101 -> GeM (trainable p, init 3) on stage 4 -> Linear 2048->``dim`` -> L2."""

    input_spec = CVNET_INPUT_SPEC
    default_scales = (0.7071, 1.0, 1.4142)
    scale_reduce = "mean"

    def __init__(self, depth: int = 50, dim: int = 2048) -> None:
        super().__init__()
        self.depth = depth
        self.dim = dim
        self.backbone = ResNet(depth)
        self.pool = GeM(p=3.0, eps=1e-6)
        self.fc = nn.Linear(ResNet.out_channels, dim, bias=True)

    def head_raw(self, x: Tensor) -> Tensor:
        """Global head output before L2 normalisation [B, dim]."""
        return self.fc(self.pool(self.backbone(x)))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.head_raw(x), p=2, dim=1)

    def rerank_map(self, x: Tensor) -> Tensor:
        """Stage-3 output of its last block before the final ReLU [B, 1024, H/16, W/16]."""
        return self.backbone.stage3_preact(x)

    def embed_and_map(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(L2 descriptor, re-rank map) from one backbone pass (extraction stores both)."""
        pre, s4 = self.backbone.features(x)
        return F.normalize(self.fc(self.pool(s4)), p=2, dim=1), pre

    def describe(self) -> dict:
        out = super().describe()
        out.update(depth=self.depth)
        return out


# ------------------------------------------------------------------------------------- re-ranker

def branch_size(h: int, w: int, area_scale: float) -> tuple[int, int]:
    """Size of a pyramid branch: sides times sqrt(area_scale), rounded half to even (Python's
    ``round``, as the published code does: 13 * 0.5 -> 6), at least 1."""
    r = math.sqrt(area_scale)
    return max(1, round(h * r)), max(1, round(w * r))


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def _block(in_ch: int, layers: Sequence[tuple[int, int, int]], groups: int = 4) -> nn.Sequential:
    """[conv4d, GroupNorm, ReLU] per (out channels, kernel, stride): conv at index 3i, GN at 3i+1
    (the published key layout)."""
    mods: list[nn.Module] = []
    for out_ch, k, s in layers:
        mods += [CenterPivotConv4d(in_ch, out_ch, k, s), nn.GroupNorm(groups, out_ch), nn.ReLU(inplace=True)]
        in_ch = out_ch
    return nn.Sequential(*mods)


class CVLearner(nn.Module):
    """4D encoder of the correlation: 4 blocks of center-pivot 4D convs, mean over the 4D
    positions, then a 2-layer MLP to 2 logits (class 1 = same instance)."""

    def __init__(self, in_channels: int = 9, groups: int = 4) -> None:
        super().__init__()
        self.block1 = _block(in_channels, [(16, 5, 2)], groups)
        self.block2 = _block(16, [(16, 3, 1), (32, 3, 2)], groups)
        self.block3 = _block(32, [(32, 3, 1), (32, 3, 1), (64, 3, 2)], groups)
        self.block4 = _block(64, [(64, 3, 1), (64, 3, 1), (128, 3, 1)], groups)
        self.mlp = nn.Sequential(nn.Linear(128, 128), nn.ReLU(inplace=True), nn.Linear(128, 2))

    @property
    def first(self) -> CenterPivotConv4d:
        return self.block1[0]

    def head(self, x: Tensor) -> Tensor:
        """From the first conv4d's output (before its GroupNorm) to logits [B, 2]."""
        x = self.block1[2](self.block1[1](x))
        x = self.block4(self.block3(self.block2(x)))
        return self.mlp(x.flatten(2).mean(dim=-1))

    def forward(self, corr: Tensor) -> Tensor:
        """``corr [B, 9, hq, wq, hk, wk]`` -> logits [B, 2]."""
        return self.head(self.first(corr))


@dataclass
class Expanded:
    """One side of a pair as the fast route reads it: ``dense [b, C, L*h*w]`` (every level
    bilinearly resized to the full level size, levels concatenated along positions) and
    ``pivots [b, h'*w'*L, C]`` (the same at the first layer's strided positions, position-major).
    Resizing is linear, so correlating resized features equals resizing their correlation, which
    is what the published code does."""

    dense: Tensor
    pivots: Tensor
    size: tuple[int, int]
    pivot_size: tuple[int, int]
    levels: int

    def nbytes(self) -> int:
        return self.dense.numel() * self.dense.element_size() + self.pivots.numel() * self.pivots.element_size()


def _pivot_conv(pivots: Tensor, dense: Tensor, size: tuple[int, int], nl: int, weight: Tensor,
                bias: Tensor | None, stride: int, bsz: int, chunk_bytes: int) -> Tensor:
    """One half of the first center-pivot layer fused with the correlation: for each pivot (``pivots
    [b, P*L, C]``), the clamped cosines with every dense vector (``dense [b, C, L*N]``) as an
    ``[L*L, h, w]`` image, convolved with ``weight`` at ``stride``: ``[B, P, O, h', w']``."""
    npiv = pivots.shape[1] // nl
    per_pivot = bsz * nl * dense.shape[2] * 4
    step = max(1, min(npiv, chunk_bytes // max(per_pivot, 1)))
    pad = weight.shape[-1] // 2
    outs = []
    for start in range(0, npiv, step):
        a = pivots[:, start * nl:(start + step) * nl]                        # [b, p*L, C]
        p = a.shape[1] // nl
        corr = torch.matmul(a, dense).clamp_(min=0)                          # [B, p*L, L*N]
        y = F.conv2d(corr.view(bsz * p, nl * nl, *size), weight, bias, stride=stride, padding=pad)
        outs.append(y.view(bsz, p, *y.shape[1:]))
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


class CVNetReranker(nn.Module):
    """Correlation-verification re-ranker on stage-3 maps (1024 channels).

    ``prepare(map)`` -> per-level projected, L2-normalised maps (cache these for database images);
    ``score(q_levels, k_levels)`` -> P(same) per candidate; ``logits`` the 2-way logits.
    """

    def __init__(self, in_channels: int = 1024, proj_channels: int = 256,
                 scales: Sequence[float] = PYRAMID_SCALES) -> None:
        super().__init__()
        self.scales = tuple(float(s) for s in scales)
        self.conv2ds = nn.ModuleList([nn.Conv2d(in_channels, proj_channels, 3, padding=1, bias=False)
                                      for _ in self.scales])
        self.cv_learner = CVLearner(len(self.scales) ** 2)
        self._full = max(range(len(self.scales)), key=lambda i: self.scales[i])

    # -- per image ---------------------------------------------------------------------------------
    def prepare(self, fmap: Tensor) -> list[Tensor]:
        """Stage-3 map [B, C, h, w] -> one [B, 256, h_l, w_l] map per pyramid level: bilinear resize
        (align_corners=True), 3x3 projection, L2 normalisation over channels (eps 1e-8)."""
        h, w = fmap.shape[-2:]
        levels = []
        for scale, conv in zip(self.scales, self.conv2ds):
            y = conv(_resize(fmap, branch_size(h, w, scale)))
            levels.append(y / (y.norm(p=2, dim=1, keepdim=True) + COSINE_EPS))
        return levels

    # -- stored form of the prepared levels -------------------------------------------------------
    @property
    def stores_levels(self) -> bool:
        """Whether extraction stores prepared levels (packed, :meth:`pack`) instead of the raw map:
        only when the two are told apart by their channel count."""
        return self.conv2ds[0].in_channels != self.conv2ds[0].out_channels

    def _other_positions(self, h: int, w: int) -> int:
        return sum(math.prod(branch_size(h, w, s)) for i, s in enumerate(self.scales) if i != self._full)

    def pack(self, levels: Sequence[Tensor]) -> Tensor:
        """Prepared levels of ONE image (each ``[1, C, h_l, w_l]`` or ``[C, h_l, w_l]``) -> one
        ``[C, h, w + E]`` array (what a FeatureStore keeps as the image's re-rank map): the full
        level in ``[:, :, :w]``, the other levels flattened, concatenated and zero-padded in the
        ``E = ceil(rest / h)`` columns after it. Why: the re-ranker needs exactly these (the raw
        stage-3 map would be projected again at every query), they are 2.3x smaller than the
        1024-channel map, and the shape alone gives back every level's size (see :meth:`unpack`)."""
        lv = [t[0] if t.dim() == 4 else t for t in levels]
        full = lv[self._full]
        ch, h, w = full.shape
        rest = torch.cat([t.reshape(ch, -1) for i, t in enumerate(lv) if i != self._full], dim=1)
        extra = -(-rest.shape[1] // h)
        tail = full.new_zeros(ch, h * extra)
        tail[:, :rest.shape[1]] = rest
        return torch.cat([full, tail.view(ch, h, extra)], dim=2)

    def unpack(self, packed: Tensor) -> list[Tensor]:
        """Inverse of :meth:`pack`: ``[C, h, W]`` (or ``[1, C, h, W]``) -> levels ``[1, C, h_l, w_l]``."""
        if packed.dim() == 4:
            packed = packed[0]
        ch, h, width = packed.shape
        w = next((w for w in range(1, width) if w + -(-self._other_positions(h, w) // h) == width), None)
        if w is None:
            raise ConfigError(f"a stored re-rank map of shape {tuple(packed.shape)} is neither a raw map "
                              f"({self.conv2ds[0].in_channels} channels) nor packed re-rank levels")
        rest = packed[:, :, w:].reshape(ch, -1)
        out, pos = [], 0
        for i, s in enumerate(self.scales):
            if i == self._full:
                out.append(packed[None, :, :, :w])
                continue
            hl, wl = branch_size(h, w, s)
            out.append(rest[None, :, pos:pos + hl * wl].reshape(1, ch, hl, wl))
            pos += hl * wl
        return [t.contiguous() for t in out]

    def levels_of(self, stored: Tensor) -> list[Tensor]:
        """Prepared levels from what a store holds for one image: packed levels (:meth:`pack`) or,
        in stores written before irkit stored levels, the raw map ``[C_in, h, w]`` (projected here)."""
        t = stored if stored.dim() == 4 else stored[None]
        if t.shape[1] == self.conv2ds[0].in_channels:
            return self.prepare(t)
        if t.shape[1] == self.conv2ds[0].out_channels:
            return self.unpack(t)
        raise ConfigError(f"a stored re-rank map has {t.shape[1]} channels; this re-ranker reads raw maps of "
                          f"{self.conv2ds[0].in_channels} or packed levels of {self.conv2ds[0].out_channels}: "
                          "the store was extracted with another model")

    def full_size(self, levels: Sequence[Tensor]) -> tuple[int, int]:
        return tuple(levels[self._full].shape[-2:])

    # -- published order of operations (full 4D tensor) -------------------------------------------------
    def correlation(self, q_levels: Sequence[Tensor], k_levels: Sequence[Tensor]) -> Tensor:
        """Full cross-scale correlation [B, L*L, hq, wq, hk, wk] (channel = L*query level + key
        level): cosine at the levels' resolution, resized back to the full level sizes (key dims,
        then query dims; bilinear, align_corners=True), clamped at 0. Query levels of batch 1
        broadcast over the key batch."""
        hq, wq = self.full_size(q_levels)
        hk, wk = self.full_size(k_levels)
        bsz = max(q_levels[0].shape[0], k_levels[0].shape[0])
        chans = []
        for fq in q_levels:
            fq = fq.expand(bsz, -1, -1, -1)
            hqi, wqi = fq.shape[-2:]
            for fk in k_levels:
                fk = fk.expand(bsz, -1, -1, -1)
                hkj, wkj = fk.shape[-2:]
                c = torch.bmm(fq.flatten(2).transpose(1, 2), fk.flatten(2))  # [B, hqi*wqi, hkj*wkj]
                c = _resize(c.reshape(bsz * hqi * wqi, 1, hkj, wkj), (hk, wk))
                c = c.reshape(bsz, hqi * wqi, hk * wk).transpose(1, 2).reshape(bsz * hk * wk, 1, hqi, wqi)
                c = _resize(c, (hq, wq)).reshape(bsz, hk, wk, hq, wq).permute(0, 3, 4, 1, 2)
                chans.append(c)
        return torch.stack(chans, dim=1).clamp(min=0)

    def forward_reference(self, q_levels: Sequence[Tensor], k_levels: Sequence[Tensor]) -> Tensor:
        """Logits [B, 2] through the full correlation tensor (the published route)."""
        return self.cv_learner(self.correlation(q_levels, k_levels))

    # -- fast route ---------------------------------------------------------------------------------
    def expand(self, levels: Sequence[Tensor], stride: int | None = None) -> Expanded:
        """What the fast route reads of one side (computed once per image, see :class:`Expanded`)."""
        s = self.cv_learner.first.stride if stride is None else stride
        size = self.full_size(levels)
        full = [_resize(lv, size) for lv in levels]                       # [b, C, h, w] per level
        dense = torch.cat([f.flatten(2) for f in full], dim=2)             # [b, C, L*h*w]
        piv = torch.stack([f[..., ::s, ::s] for f in full], dim=1)        # [b, L, C, h', w']
        h2, w2 = piv.shape[-2:]
        pivots = piv.flatten(3).permute(0, 3, 1, 2).reshape(piv.shape[0], h2 * w2 * len(levels), -1)
        return Expanded(dense.contiguous(), pivots.contiguous(), size, (h2, w2), len(levels))

    def logits(self, q_levels: Sequence[Tensor] | Expanded, k_levels: Sequence[Tensor] | Expanded,
               chunk_bytes: int = 4 << 20) -> Tensor:
        """Logits [B, 2] for one query (batch 1, or B pairs) against B candidates whose maps have
        equal size. Takes prepared levels or their :meth:`expand`. ``chunk_bytes`` bounds each piece
        of the correlation computed at once (small pieces stay in cache: 4 MiB measured best).

        Inference runs the 4D encoder channels-last and in place (:func:`center_pivot_conv4d_cl`);
        with gradients enabled (training) the same first layer feeds the module's own layers."""
        qx = q_levels if isinstance(q_levels, Expanded) else self.expand(q_levels)
        kx = k_levels if isinstance(k_levels, Expanded) else self.expand(k_levels)
        x = self._first_layer_cl(qx, kx, chunk_bytes)
        cv = self.cv_learner
        if torch.is_grad_enabled():
            return cv.head(from_channels_last_4d(x))
        bsz = x.shape[0]
        for block in (cv.block1, cv.block2, cv.block3, cv.block4):
            for i in range(0, len(block), 3):
                conv, gn = block[i], block[i + 1]
                if block is not cv.block1:
                    x = conv.forward_cl(x)
                group_norm_cl(x, gn.num_groups, gn.weight, gn.bias, gn.eps, relu=True)
        return cv.mlp(x.reshape(bsz, -1, x.shape[-1]).mean(dim=1))

    def _first_layer_cl(self, qx: Expanded, kx: Expanded, chunk_bytes: int) -> Tensor:
        """Output of the first center-pivot conv (before its GroupNorm), channels-last
        ``[B, hq', wq', hk', wk', 16]``, straight from the expanded levels.

        Query-dims half: for each strided key position (pivot), the cosine of its L key-level
        vectors with every full-size query-level vector is ONE matmul ``[P*L, C] x [C, L*N]`` whose
        output is already the NCHW input of the 2D conv (channel = key level * L + query level: the
        conv weight's input channels are permuted to match instead of the data), clamped in place
        and convolved. Key-dims half the same with the roles swapped (channel order already the
        published one). Chunked over pivots so that a piece stays within ``chunk_bytes``."""
        first = self.cv_learner.first
        s = first.stride
        bsz = max(qx.dense.shape[0], kx.dense.shape[0])
        nl = qx.levels
        (hq2, wq2), (hk2, wk2) = qx.pivot_size, kx.pivot_size
        w1 = first.conv1.weight
        w1 = w1.view(w1.shape[0], nl, nl, *w1.shape[2:]).transpose(1, 2).reshape(w1.shape)
        # query-dims conv at the strided key positions: [B, Pk, O, hq', wq']
        out_q = _pivot_conv(kx.pivots, qx.dense, qx.size, nl, w1, first.conv1.bias, s, bsz, chunk_bytes)
        och = out_q.shape[2]
        # key-dims conv at the strided query positions: [B, Pq, O, hk', wk']
        out_k = _pivot_conv(qx.pivots, kx.dense, kx.size, nl, first.conv2.weight, first.conv2.bias, s, bsz,
                            chunk_bytes)
        out = out_k.view(bsz, hq2, wq2, och, hk2, wk2).permute(0, 1, 2, 4, 5, 3).contiguous()
        del out_k
        return out + out_q.view(bsz, hk2, wk2, och, hq2, wq2).permute(0, 4, 5, 1, 2, 3) \
            if torch.is_grad_enabled() else out.add_(out_q.view(bsz, hk2, wk2, och, hq2, wq2).permute(0, 4, 5, 1, 2, 3))

    def score(self, q_levels: Sequence[Tensor] | Expanded, k_levels: Sequence[Tensor] | Expanded,
              chunk_bytes: int = 4 << 20) -> Tensor:
        """P(same instance) [B] for one query against B equal-size candidates."""
        return torch.softmax(self.logits(q_levels, k_levels, chunk_bytes), dim=1)[:, 1]

    def forward(self, query_map: Tensor, key_map: Tensor) -> Tensor:
        """Scores [B] from raw stage-3 maps (convenience; prepare + score)."""
        return self.score(self.prepare(query_map), self.prepare(key_map))


# ------------------------------------------------------------------------------- combined module

class CVNet(CVNetGlobal):
    """What a CVNet preset builds: the global model plus ``reranker`` (one checkpoint for both)."""

    def __init__(self, depth: int = 50, dim: int = 2048) -> None:
        super().__init__(depth, dim)
        self.reranker = CVNetReranker(in_channels=ResNet.stage3_channels)

    def rerank_levels(self, x: Tensor) -> list[Tensor]:
        """Image batch at scale 1.0 -> prepared re-rank levels."""
        return self.reranker.prepare(self.rerank_map(x))


# ------------------------------------------------------------------------------ checkpoint keys

_OFFICIAL_HEAD = {"encoder_q.head.pool.": "pool.", "encoder_q.head.fc.": "fc."}
_OFFICIAL_RERANK = ("conv2ds.", "cv_learner.")
_PYCLS_KEY = re.compile(r"^(stem\.(conv|bn)\.|s\d\.b\d+\.(f\.(a|a_bn|b|b_bn|c|c_bn)|proj|bn)\.)")
_TV_KEY = re.compile(r"^(conv1\.|bn1\.|layer\d\.\d+\.(conv[123]|bn[123]|downsample\.[01])\.)")


def official_to_irkit(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Published CVNet ``model_state`` keys -> irkit :class:`CVNet` keys (lossless; a key that fits
    no rule keeps its published name, so a strict load reports it under that name)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = key
        for src, dst in _OFFICIAL_HEAD.items():
            if key.startswith(src):
                new = dst + key[len(src):]
                break
        else:
            if key.startswith(_OFFICIAL_RERANK):
                new = "reranker." + key
            elif key.startswith("encoder_q.") and _PYCLS_KEY.match(key[len("encoder_q."):]):
                new = "backbone." + pycls_key_to_torchvision(key[len("encoder_q."):])
        out[new] = value
    return out


def irkit_to_official(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`official_to_irkit`: write a checkpoint in the published layout."""
    inverse_head = {v: k for k, v in _OFFICIAL_HEAD.items()}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = key
        for src, dst in inverse_head.items():
            if key.startswith(src):
                new = dst + key[len(src):]
                break
        else:
            if key.startswith("reranker.") and key[len("reranker."):].startswith(_OFFICIAL_RERANK):
                new = key[len("reranker."):]
            elif key.startswith("backbone.") and _TV_KEY.match(key[len("backbone."):]):
                new = "encoder_q." + torchvision_key_to_pycls(key[len("backbone."):])
        out[new] = value
    return out


def _build(depth: int) -> Callable[..., CVNet]:
    def build(dim: int = 2048) -> CVNet:
        return CVNet(depth=depth, dim=dim)
    return build


for _depth in (50, 101):
    register_preset(Preset(
        name=f"cvnet-r{_depth}",
        build=_build(_depth),
        description=(f"CVNet ResNet-{_depth}: GeM global descriptor (2048-D, BGR input, scales "
                     "0.7071/1/1.4142) + correlation-verification re-ranker; loads the published "
                     "CVNet checkpoint (model_state with encoder_q.*, conv2ds.*, cv_learner.*)"),
        convert=official_to_irkit,
        unconvert=irkit_to_official,
    ))

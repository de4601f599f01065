"""Region proposals for R-MAC (Gordo et al.): a small head on the last conv map chooses the pooled
regions instead of the fixed Tolias grid.

Why a learned head: the grid pools the same squares for every image, so clutter and sky are
aggregated as much as the landmark. A proposal head scores anchor boxes at every map position
(several sizes and aspect ratios), regresses box corrections, and the top-N boxes after NMS are
the R-MAC regions. It is trained with boxes known from the data (for synthetic warps: the part of
the image that is visible in both views) by BCE on anchor labels from IoU + smooth-L1 on the box
deltas of the positive anchors, then jointly with the ranking loss (the box choice itself is not
differentiable; the ranking loss trains the backbone and the region whitening).

Coordinates: boxes are ``[x1, y1, x2, y2]`` floats in *feature-map cells* (0..w, 0..h); a cell
(i, j) spans [j, j+1] x [i, i+1]. ``image_to_map`` converts pixel boxes with the net's stride.
Everything uses plain torch ops (no torchvision).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from irkit.nn.pooling import RegionProjection, regional_descriptor

_DELTA_CLAMP = math.log(1000.0 / 16)


# ------------------------------------------------------------------------------- anchors & boxes
def make_anchors(h: int, w: int, sizes: Sequence[float] = (2.0, 4.0, 6.0),
                 ratios: Sequence[float] = (0.5, 1.0, 2.0), device: torch.device | str | None = None
                 ) -> Tensor:
    """Anchors ``[h*w*A, 4]`` (A = len(sizes)*len(ratios)) centred on every cell, position-major:
    row ``(i*w + j)*A + a``. ``ratio`` = height/width; ``size`` = sqrt(area) in cells."""
    shapes = []
    for s in sizes:
        for r in ratios:
            shapes.append((s / math.sqrt(r), s * math.sqrt(r)))
    wh = torch.tensor(shapes, dtype=torch.float32, device=device)               # [A, 2]
    ys = torch.arange(h, dtype=torch.float32, device=device) + 0.5
    xs = torch.arange(w, dtype=torch.float32, device=device) + 0.5
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    centres = torch.stack([cx, cy], -1).reshape(-1, 1, 2)                     # [hw, 1, 2]
    half = (wh / 2).unsqueeze(0)                                               # [1, A, 2]
    return torch.cat([centres - half, centres + half], -1).reshape(-1, 4)


def box_area(b: Tensor) -> Tensor:
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU matrix ``[Na, Nb]`` of two box sets."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / union.clamp(min=1e-9)


def encode_deltas(anchors: Tensor, boxes: Tensor) -> Tensor:
    """Regression targets (dx, dy, dw, dh) taking ``anchors`` to ``boxes`` (Faster R-CNN form)."""
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + aw / 2, anchors[:, 1] + ah / 2
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    bx, by = boxes[:, 0] + bw / 2, boxes[:, 1] + bh / 2
    return torch.stack([(bx - ax) / aw, (by - ay) / ah,
                        torch.log(bw.clamp(min=1e-6) / aw), torch.log(bh.clamp(min=1e-6) / ah)], -1)


def decode_deltas(anchors: Tensor, deltas: Tensor) -> Tensor:
    """Inverse of ``encode_deltas`` (log-size deltas clamped so boxes stay finite)."""
    aw, ah = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
    ax, ay = anchors[..., 0] + aw / 2, anchors[..., 1] + ah / 2
    cx, cy = ax + deltas[..., 0] * aw, ay + deltas[..., 1] * ah
    bw = aw * torch.exp(deltas[..., 2].clamp(max=_DELTA_CLAMP))
    bh = ah * torch.exp(deltas[..., 3].clamp(max=_DELTA_CLAMP))
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)


def clip_boxes(boxes: Tensor, h: int, w: int) -> Tensor:
    return torch.stack([boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h),
                        boxes[..., 2].clamp(0, w), boxes[..., 3].clamp(0, h)], -1)


def image_to_map(boxes: Tensor, stride: float) -> Tensor:
    """Pixel boxes -> feature-map cell boxes for a net of total ``stride``."""
    return boxes / float(stride)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression; indices of kept boxes by decreasing score.

    The IoU matrix is computed once; the greedy pass walks the sorted list (O(N^2) memory, fine for
    the few hundred pre-NMS proposals a map has)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)
    iou = box_iou(boxes[order], boxes[order])
    n = order.numel()
    suppressed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    keep = []
    over = (iou > iou_threshold).cpu()
    sup = suppressed.cpu()
    for i in range(n):
        if sup[i]:
            continue
        keep.append(i)
        sup |= over[i]
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


# ----------------------------------------------------------------------------------- region pooling
def boxes_to_cells(boxes: Tensor, h: int, w: int) -> Tensor:
    """Float map boxes -> int64 ``[R, 4]`` (x1, y1, x2, y2) end-exclusive cell ranges covering each
    box (floor of the start, ceil of the end), clipped to the map and at least one cell wide: the
    box format of :func:`irkit.nn.pooling.pool_regions`."""
    b = boxes.detach().float()
    x1 = b[:, 0].floor().clamp(0, w - 1)
    y1 = b[:, 1].floor().clamp(0, h - 1)
    x2 = torch.maximum(b[:, 2].ceil().clamp(max=w), x1 + 1)
    y2 = torch.maximum(b[:, 3].ceil().clamp(max=h), y1 + 1)
    return torch.stack([x1, y1, x2, y2], -1).long()


# --------------------------------------------------------------------------------------- the head
@dataclass(frozen=True)
class ProposalConfig:
    """Anchor shapes and proposal selection."""

    sizes: tuple[float, ...] = (2.0, 4.0, 6.0)
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    mid_channels: int = 256
    pre_nms: int = 300
    top_n: int = 12
    nms_iou: float = 0.5
    min_size: float = 1.0
    pos_iou: float = 0.6
    neg_iou: float = 0.3


class ProposalHead(nn.Module):
    """3x3 conv + ReLU, then per anchor an objectness logit (1x1 conv) and 4 box deltas (1x1 conv)."""

    def __init__(self, in_channels: int, cfg: ProposalConfig = ProposalConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_anchors = len(cfg.sizes) * len(cfg.ratios)
        self.conv = nn.Conv2d(in_channels, cfg.mid_channels, 3, padding=1)
        self.cls = nn.Conv2d(cfg.mid_channels, self.num_anchors, 1)
        self.reg = nn.Conv2d(cfg.mid_channels, 4 * self.num_anchors, 1)
        for m in (self.conv, self.cls, self.reg):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)

    def forward(self, fmap: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``fmap [B, C, h, w]`` -> (logits [B, hwA], deltas [B, hwA, 4], anchors [hwA, 4])."""
        b, _, h, w = fmap.shape
        t = F.relu(self.conv(fmap))
        logits = self.cls(t).permute(0, 2, 3, 1).reshape(b, -1)
        deltas = self.reg(t).permute(0, 2, 3, 1).reshape(b, -1, 4)
        anchors = make_anchors(h, w, self.cfg.sizes, self.cfg.ratios, device=fmap.device)
        return logits, deltas, anchors

    @torch.no_grad()
    def propose(self, fmap: Tensor, top_n: int | None = None) -> list[Tensor]:
        """Per image, up to ``top_n`` boxes (map cells) after decoding, clipping and NMS."""
        cfg = self.cfg
        top_n = cfg.top_n if top_n is None else top_n
        logits, deltas, anchors = self(fmap.detach())
        h, w = fmap.shape[-2:]
        out = []
        for i in range(fmap.shape[0]):
            boxes = clip_boxes(decode_deltas(anchors, deltas[i].float()), h, w)
            keep = ((boxes[:, 2] - boxes[:, 0]) >= cfg.min_size) & ((boxes[:, 3] - boxes[:, 1]) >= cfg.min_size)
            boxes, scores = boxes[keep], logits[i].float()[keep]
            if scores.numel() > cfg.pre_nms:
                idx = scores.topk(cfg.pre_nms).indices
                boxes, scores = boxes[idx], scores[idx]
            kept = nms(boxes, scores, cfg.nms_iou)[:top_n]
            chosen = boxes[kept]
            if chosen.shape[0] == 0:  # degenerate map: fall back to the whole map
                chosen = fmap.new_tensor([[0.0, 0.0, float(w), float(h)]])
            if chosen.shape[0] < top_n:  # a fixed count per image lets the batch pool as [B, R, 4]
                chosen = torch.cat([chosen, chosen[:1].expand(top_n - chosen.shape[0], 4)])
            out.append(chosen)
        return out


def anchor_labels(anchors: Tensor, gt: Tensor, pos_iou: float = 0.6, neg_iou: float = 0.3
                  ) -> tuple[Tensor, Tensor]:
    """Labels per anchor (1 positive, 0 negative, -1 ignored) and the matched gt box of each.

    Positive: IoU >= ``pos_iou`` with some gt box, or the best anchor of a gt box (so every box has
    at least one positive); negative: max IoU < ``neg_iou``."""
    labels = torch.full((anchors.shape[0],), -1.0, device=anchors.device)
    if gt.numel() == 0:
        labels.zero_()
        return labels, anchors.clone()
    iou = box_iou(anchors, gt)                       # [N, G]
    best, idx = iou.max(1)
    labels[best < neg_iou] = 0.0
    labels[best >= pos_iou] = 1.0
    best_anchor = iou.argmax(0)                      # [G]
    labels[best_anchor] = 1.0
    idx[best_anchor] = torch.arange(gt.shape[0], device=gt.device)
    return labels, gt[idx]


def proposal_loss(logits: Tensor, deltas: Tensor, anchors: Tensor, gt_boxes: Sequence[Tensor],
                  pos_iou: float = 0.6, neg_iou: float = 0.3) -> tuple[Tensor, dict[str, float]]:
    """BCE on anchor labels (positives and negatives balanced to equal total weight) + smooth-L1 on
    the deltas of positive anchors; mean over images. ``gt_boxes[i]`` is ``[G_i, 4]`` in map cells."""
    cls_terms, reg_terms = [], []
    for i, gt in enumerate(gt_boxes):
        labels, matched = anchor_labels(anchors, gt.to(anchors), pos_iou, neg_iou)
        pos, neg = labels == 1, labels == 0
        weight = torch.zeros_like(labels)
        if pos.any():
            weight[pos] = 0.5 / pos.sum()
        if neg.any():
            weight[neg] = (0.5 if pos.any() else 1.0) / neg.sum()
        bce = F.binary_cross_entropy_with_logits(logits[i].float(), labels.clamp(min=0), reduction="none")
        cls_terms.append((bce * weight).sum())
        if pos.any():
            target = encode_deltas(anchors[pos], matched[pos])
            reg_terms.append(F.smooth_l1_loss(deltas[i][pos].float(), target, beta=1.0 / 9, reduction="mean"))
    cls = torch.stack(cls_terms).mean()
    reg = torch.stack(reg_terms).mean() if reg_terms else logits.sum() * 0.0
    return cls + reg, {"rpn_cls": float(cls.detach()), "rpn_reg": float(reg.detach())}


class ProposalRMAC(nn.Module):
    """R-MAC whose regions come from a ProposalHead: per region max-pool -> L2 -> optional learned
    shift + FC (:class:`irkit.nn.pooling.RegionProjection`) -> L2; sum -> L2. ``include_full`` adds
    the whole map as one region (so an untrained head still yields a sensible descriptor)."""

    def __init__(self, in_channels: int, cfg: ProposalConfig = ProposalConfig(), out_dim: int | None = None,
                 include_full: bool = True, pool: str = "max", project: bool = True) -> None:
        super().__init__()
        self.head = ProposalHead(in_channels, cfg)
        self.include_full = include_full
        self.pool = pool
        self.proj = RegionProjection(in_channels, out_dim) if project else None
        if self.proj is not None:
            if (out_dim or in_channels) == in_channels:
                nn.init.eye_(self.proj.fc.weight)
            else:
                nn.init.orthogonal_(self.proj.fc.weight)
        self.dim = (out_dim or in_channels) if project else in_channels

    def regions(self, fmap: Tensor) -> Tensor:
        """Integer cell boxes ``[B, R, 4]`` for :func:`irkit.nn.pooling.pool_regions`."""
        h, w = fmap.shape[-2:]
        boxes = self.head.propose(fmap)
        if self.include_full:
            full = fmap.new_tensor([[0.0, 0.0, float(w), float(h)]])
            boxes = [torch.cat([full, b]) for b in boxes]
        return torch.stack([boxes_to_cells(b, h, w) for b in boxes])

    def forward(self, fmap: Tensor, boxes: Tensor | None = None) -> Tensor:
        cells = self.regions(fmap) if boxes is None else boxes
        return regional_descriptor(fmap, cells, self.pool, self.proj)

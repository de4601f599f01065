"""Region proposals: anchors, IoU, NMS and labels against brute force; pooling against slicing."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from irkit.nn import region_proposals as R
from irkit.nn.pooling import pool_regions


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _random_boxes(n, size=20.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 2 + 0.5
    return torch.cat([xy, xy + wh], 1)


def test_anchors_match_brute_force():
    h, w, sizes, ratios = 3, 4, (2.0, 5.0), (0.5, 1.0, 2.0)
    anchors = R.make_anchors(h, w, sizes, ratios)
    expected = []
    for i in range(h):
        for j in range(w):
            for s in sizes:
                for r in ratios:
                    aw, ah = s / math.sqrt(r), s * math.sqrt(r)
                    cx, cy = j + 0.5, i + 0.5
                    expected.append([cx - aw / 2, cy - ah / 2, cx + aw / 2, cy + ah / 2])
    assert anchors.shape == (h * w * len(sizes) * len(ratios), 4)
    torch.testing.assert_close(anchors, torch.tensor(expected), rtol=0, atol=1e-6)
    area = R.box_area(anchors).reshape(h * w, len(sizes), len(ratios))
    torch.testing.assert_close(area[0, :, 0], torch.tensor(sizes) ** 2)   # size = sqrt(area)


def test_box_iou_matches_brute_force():
    a, b = _random_boxes(17, seed=1), _random_boxes(9, seed=2)
    iou = R.box_iou(a, b)
    for i in range(len(a)):
        for j in range(len(b)):
            assert iou[i, j].item() == pytest.approx(_iou(a[i].tolist(), b[j].tolist()), abs=1e-6)


@pytest.mark.parametrize("thr", [0.1, 0.3, 0.5, 0.7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_matches_brute_force(thr, seed):
    boxes = _random_boxes(60, seed=seed)
    scores = torch.rand(60, generator=torch.Generator().manual_seed(seed + 10))
    keep = R.nms(boxes, scores, thr).tolist()
    order = sorted(range(60), key=lambda i: -scores[i].item())
    ref = []
    for i in order:
        if all(_iou(boxes[i].tolist(), boxes[k].tolist()) <= thr for k in ref):
            ref.append(i)
    assert keep == ref
    assert R.nms(boxes[:0], scores[:0], thr).numel() == 0


def test_deltas_roundtrip():
    anchors = R.make_anchors(4, 5)
    boxes = anchors + torch.randn(anchors.shape, generator=torch.Generator().manual_seed(0)) * 0.2
    boxes = torch.cat([boxes[:, :2], torch.maximum(boxes[:, 2:], boxes[:, :2] + 0.1)], 1)
    back = R.decode_deltas(anchors, R.encode_deltas(anchors, boxes))
    torch.testing.assert_close(back, boxes, rtol=1e-4, atol=1e-4)


def test_anchor_labels_from_iou():
    anchors = R.make_anchors(6, 6, sizes=(2.0, 4.0), ratios=(1.0,))
    gt = torch.tensor([[1.5, 1.5, 5.5, 5.5]])        # exactly the size-4 anchor of cell (3, 3)
    labels, matched = R.anchor_labels(anchors, gt, pos_iou=0.6, neg_iou=0.3)
    iou = R.box_iou(anchors, gt)[:, 0]
    best = int(iou.argmax())
    assert iou[best] == pytest.approx(1.0) and labels[best] == 1
    assert torch.all(labels[iou >= 0.6] == 1)
    assert torch.all(labels[iou < 0.3] == 0)
    assert torch.all(labels[(iou >= 0.3) & (iou < 0.6)] == -1)
    torch.testing.assert_close(matched[labels == 1], gt.expand(int((labels == 1).sum()), 4))
    # a tiny box nobody overlaps well still gets its best anchor as positive
    labels2, _ = R.anchor_labels(anchors, torch.tensor([[0.0, 0.0, 0.6, 0.6]]))
    assert labels2.sum() == 1


def test_pooled_regions_match_manual_slicing():
    fmap = torch.randn(8, 7, 9, generator=torch.Generator().manual_seed(3))
    boxes = torch.tensor([[0.0, 0.0, 9.0, 7.0], [1.2, 0.5, 4.7, 3.1], [8.6, 6.5, 9.0, 7.0], [2.0, 2.0, 2.0, 2.0]])
    cells = R.boxes_to_cells(boxes, 7, 9).tolist()
    assert cells == [[0, 0, 9, 7], [1, 0, 5, 4], [8, 6, 9, 7], [2, 2, 3, 3]]
    for kind in ("max", "avg"):
        pooled = pool_regions(fmap[None], R.boxes_to_cells(boxes, 7, 9), kind)[0]
        for r, (x1, y1, x2, y2) in enumerate(cells):
            patch = fmap[:, y1:y2, x1:x2].reshape(8, -1)
            ref = patch.amax(1) if kind == "max" else patch.mean(1)
            torch.testing.assert_close(pooled[r], ref)


def test_proposal_rmac_uses_proposed_regions():
    torch.manual_seed(0)
    fmap = torch.rand(2, 16, 6, 8)
    head = R.ProposalRMAC(16, R.ProposalConfig(top_n=5, mid_channels=8), project=False)
    cells = head.regions(fmap)
    assert cells.shape == (2, 6, 4)                       # full map + top 5
    assert cells[:, 0].tolist() == [[0, 0, 8, 6]] * 2
    desc = head(fmap)
    for i in range(2):
        regs = torch.stack([F.normalize(fmap[i, :, y1:y2, x1:x2].reshape(16, -1).amax(1), dim=0)
                            for x1, y1, x2, y2 in cells[i].tolist()])
        torch.testing.assert_close(desc[i], F.normalize(regs.sum(0), dim=0))
    assert torch.allclose(desc.norm(dim=1), torch.ones(2))


def test_proposal_head_learns_a_box():
    """BCE + smooth-L1 on one known box: the top proposals move onto it (ignored anchors, IoU in
    [neg_iou, pos_iou), get no gradient, so the very first proposal need not be the best one)."""
    torch.manual_seed(0)
    fmap = torch.rand(1, 8, 10, 10)
    fmap[:, :4, 2:7, 3:9] += 2.0                             # a distinctive region
    gt = torch.tensor([[3.0, 2.0, 9.0, 7.0]])
    head = R.ProposalHead(8, R.ProposalConfig(mid_channels=16, sizes=(2.0, 4.0, 6.0)))
    opt = torch.optim.Adam(head.parameters(), lr=2e-2)
    first = None
    for _ in range(50):
        loss, _ = R.proposal_loss(*head(fmap), [gt])
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first
    top = head.propose(fmap, top_n=3)[0]
    assert R.box_iou(top, gt).max().item() > 0.7

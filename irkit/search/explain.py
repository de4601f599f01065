"""Why do two images match? Pair scores (global, re-rank, mixed) and a picture of the strongest
correlation matches, shared by the CLI (`irkit verify`, `irkit explain`) and the HTTP service.

The picture shows the query (left) and the other image (right) side by side, the strongest mutual
nearest-neighbour matches of the re-ranker's correlation as lines (colour = strength), and
optionally each image tinted by its best correlation per position (a heat map).
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from irkit.errors import ConfigError
from irkit.extract import embed_arrays
from irkit.io.images import resize_max_side, to_tensor
from irkit.models.base import GlobalModel

log = logging.getLogger(__name__)


def _reranker(model: GlobalModel):
    rr = getattr(model, "reranker", None)
    if rr is None:
        raise ConfigError(f"model {getattr(model, 'preset_name', type(model).__name__)!r} has no re-ranker; "
                          "use a CVNet preset (cvnet-r50, cvnet-r101)")
    return rr


def _scale1_input(model: GlobalModel, img: np.ndarray) -> torch.Tensor:
    """The re-rank input: the image at scale 1.0 (after the preset's max-side resize, if any)."""
    spec = model.input_spec
    if spec.max_side:
        img = resize_max_side(img, spec.max_side, spec.interp_down, spec.interp_up)
    device = next(model.parameters()).device
    return to_tensor(img, spec)[None].to(device)


def _global_descriptors(model: GlobalModel, images: Sequence[np.ndarray], scales: Sequence[float] | None) -> np.ndarray:
    return embed_arrays(model, list(images), scales)


@torch.inference_mode()
def rerank_levels(model: GlobalModel, img: np.ndarray) -> list[torch.Tensor]:
    """Prepared re-rank levels of one RGB uint8 image."""
    return _reranker(model).prepare(model.rerank_map(_scale1_input(model, img)))


@torch.inference_mode()
def verify_pair(model: GlobalModel, query: np.ndarray, image: np.ndarray, scales: Sequence[float] | None = None,
                lam: float = 0.5) -> dict[str, float]:
    """``{"global", "rerank", "score"}`` of a (query, image) pair: global cosine similarity of the
    multi-scale descriptors, re-rank P(same instance) with ``query`` as the query, and
    ``global + lam * rerank``."""
    rr = _reranker(model)
    desc = _global_descriptors(model, [query, image], scales)
    glob = float(desc[0] @ desc[1])
    rerank = float(rr.score(rerank_levels(model, query), rerank_levels(model, image))[0])
    return {"global": glob, "rerank": rerank, "score": glob + lam * rerank}


@dataclass
class Matches:
    """Matches in pixel coordinates of the two input images, strongest first."""

    query_xy: np.ndarray    # [n, 2] float (x, y)
    image_xy: np.ndarray    # [n, 2]
    strength: np.ndarray    # [n] correlation in [0, 1]
    query_heat: np.ndarray  # [hq, wq] best correlation of each query position
    image_heat: np.ndarray  # [hk, wk]


@torch.inference_mode()
def correlation_matches(model: GlobalModel, query: np.ndarray, image: np.ndarray, top: int = 40) -> Matches:
    """Strongest mutual nearest neighbours of the re-ranker's correlation, averaged over the three
    same-level channels (each level resized to the full map size), clamped at 0."""
    rr = _reranker(model)
    q_lv, k_lv = rerank_levels(model, query), rerank_levels(model, image)
    (hq, wq), (hk, wk) = rr.full_size(q_lv), rr.full_size(k_lv)
    gq = torch.cat([F.interpolate(lv, (hq, wq), mode="bilinear", align_corners=True) for lv in q_lv], 1)
    gk = torch.cat([F.interpolate(lv, (hk, wk), mode="bilinear", align_corners=True) for lv in k_lv], 1)
    corr = (gq.flatten(2)[0].T @ gk.flatten(2)[0] / len(q_lv)).clamp_(min=0)   # [hq*wq, hk*wk]
    best_k = corr.max(dim=1)
    best_q = corr.max(dim=0)
    q_idx = torch.arange(corr.shape[0])
    mutual = best_q.indices[best_k.indices] == q_idx
    cand = q_idx[mutual]
    strength = best_k.values[cand]
    order = torch.argsort(strength, descending=True)[:top]
    qi, ki, st = cand[order].numpy(), best_k.indices[cand[order]].numpy(), strength[order].numpy()

    def to_xy(idx: np.ndarray, h: int, w: int, img: np.ndarray) -> np.ndarray:
        ys, xs = np.divmod(idx, w)
        return np.stack([(xs + 0.5) * img.shape[1] / w, (ys + 0.5) * img.shape[0] / h], axis=1)

    return Matches(to_xy(qi, hq, wq, query), to_xy(ki, hk, wk, image), st,
                   best_k.values.view(hq, wq).numpy(), best_q.values.view(hk, wk).numpy())


def draw_matches(query: np.ndarray, image: np.ndarray, matches: Matches, heat: bool = True,
                 height: int = 480, title: str | None = None) -> np.ndarray:
    """Side-by-side RGB uint8 picture: both images scaled to ``height``, lines for the matches
    (colour from weak = blue to strong = red), optional heat-map tint."""
    panels, scales = [], []
    for img, heat_map in ((query, matches.query_heat), (image, matches.image_heat)):
        s = height / img.shape[0]
        w = max(1, round(img.shape[1] * s))
        panel = cv2.resize(img, (w, height), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
        if heat:
            hm = cv2.resize(heat_map.astype(np.float32), (w, height), interpolation=cv2.INTER_LINEAR)
            lo, hi = float(hm.min()), float(hm.max())
            hm = np.uint8(255 * (hm - lo) / (hi - lo)) if hi > lo else np.zeros_like(hm, np.uint8)
            color = cv2.cvtColor(cv2.applyColorMap(hm, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
            panel = cv2.addWeighted(panel, 0.65, color, 0.35, 0)
        panels.append(np.ascontiguousarray(panel))
        scales.append(s)
    gap = 8
    canvas = np.full((height, panels[0].shape[1] + gap + panels[1].shape[1], 3), 255, np.uint8)
    canvas[:, :panels[0].shape[1]] = panels[0]
    offset = panels[0].shape[1] + gap
    canvas[:, offset:] = panels[1]
    st = matches.strength
    lo, hi = (float(st.min()), float(st.max())) if len(st) else (0.0, 1.0)
    for (qx, qy), (kx, ky), v in zip(matches.query_xy, matches.image_xy, st):
        t = (v - lo) / (hi - lo) if hi > lo else 1.0
        color = (int(255 * t), 64, int(255 * (1 - t)))
        p1 = (int(round(qx * scales[0])), int(round(qy * scales[0])))
        p2 = (int(round(kx * scales[1])) + offset, int(round(ky * scales[1])))
        cv2.line(canvas, p1, p2, color, 2, cv2.LINE_AA)
        cv2.circle(canvas, p1, 4, color, -1, cv2.LINE_AA)
        cv2.circle(canvas, p2, 4, color, -1, cv2.LINE_AA)
    if title:   # on a white band above the pictures, so lines never hide it
        band = np.full((30, canvas.shape[1], 3), 255, np.uint8)
        cv2.putText(band, title, (8, 21), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        canvas = np.ascontiguousarray(np.concatenate([band, canvas], axis=0))
    return canvas


def explain_pair(model: GlobalModel, query: np.ndarray, image: np.ndarray, top: int = 40, heat: bool = True,
                 height: int = 480, scales: Sequence[float] | None = None, lam: float = 0.5) -> tuple[np.ndarray, dict]:
    """The picture (RGB uint8) and the pair's scores (see :func:`verify_pair`)."""
    scores = verify_pair(model, query, image, scales, lam)
    matches = correlation_matches(model, query, image, top)
    title = f"global {scores['global']:.3f}  rerank {scores['rerank']:.3f}  score {scores['score']:.3f}"
    return draw_matches(query, image, matches, heat=heat, height=height, title=title), scores


def explain_png(model: GlobalModel, query: np.ndarray, image: np.ndarray, top: int = 40, heat: bool = True,
                height: int = 480) -> bytes:
    """PNG bytes of :func:`explain_pair`'s picture (what the HTTP service returns)."""
    picture, _ = explain_pair(model, query, image, top=top, heat=heat, height=height)
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    return buf.getvalue()

"""The match-explanation picture: query and database image side by side, joined by their strongest
mutually-nearest CVNet feature correspondences, with the re-ranker's P(same instance) in a caption.

Uses ``irkit.search.explain`` when that module provides ``explain_png``/``explain_image``; this
module's own drawing is the fallback so the endpoint works with any model that has a ``reranker``.
"""
from __future__ import annotations

import io
import logging
from typing import Sequence

import cv2
import numpy as np
import torch
from PIL import Image

from irkit.extract import scaled_inputs
from irkit.models.base import GlobalModel

log = logging.getLogger(__name__)

PANEL_HEIGHT = 320
MAX_LINES = 30


@torch.inference_mode()
def _levels(model: GlobalModel, img: np.ndarray) -> tuple[list[torch.Tensor], tuple[int, int]]:
    x = scaled_inputs(model, img, (1.0,))[0][None]
    device = next(model.parameters()).device
    fmap = model.rerank_map(x.to(device)).float()
    return model.reranker.prepare(fmap), tuple(x.shape[-2:])


def correspondences(model: GlobalModel, query: np.ndarray, db: np.ndarray, top: int = MAX_LINES
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Mutual nearest neighbours of the full-resolution level: (query xy [n,2], db xy [n,2],
    cosine [n], P(same)), coordinates in the pixels of the given images."""
    ql, q_in = _levels(model, query)
    kl, k_in = _levels(model, db)
    with torch.inference_mode():
        prob = float(model.reranker.score(ql, kl)[0])
    full = model.reranker._full if hasattr(model.reranker, "_full") else len(ql) - 1
    fq, fk = ql[full][0], kl[full][0]                       # [C, hq, wq], [C, hk, wk]
    hq, wq = fq.shape[-2:]
    hk, wk = fk.shape[-2:]
    sim = (fq.flatten(1).T @ fk.flatten(1)).cpu().numpy()   # [hq*wq, hk*wk]
    best_k = sim.argmax(1)
    best_q = sim.argmax(0)
    mutual = np.flatnonzero(best_q[best_k] == np.arange(len(best_k)))
    cos = sim[mutual, best_k[mutual]]
    order = np.argsort(-cos)[:top]
    qi, ki = mutual[order], best_k[mutual[order]]

    def to_xy(idx: np.ndarray, h: int, w: int, img: np.ndarray) -> np.ndarray:
        ys, xs = np.divmod(idx, w)
        return np.stack([(xs + 0.5) * img.shape[1] / w, (ys + 0.5) * img.shape[0] / h], 1)

    return to_xy(qi, hq, wq, query), to_xy(ki, hk, wk, db), cos[order], prob


def draw(query: np.ndarray, db: np.ndarray, q_xy: np.ndarray, k_xy: np.ndarray, cos: np.ndarray,
         caption: str) -> np.ndarray:
    """Side-by-side RGB canvas with coloured lines (green = strong, red = weak) and a caption."""
    def fit(img: np.ndarray) -> tuple[np.ndarray, float]:
        s = PANEL_HEIGHT / img.shape[0]
        return cv2.resize(img, (max(1, round(img.shape[1] * s)), PANEL_HEIGHT), interpolation=cv2.INTER_AREA), s

    a, sa = fit(query)
    b, sb = fit(db)
    gap = 10
    canvas = np.full((PANEL_HEIGHT + 36, a.shape[1] + gap + b.shape[1], 3), 255, np.uint8)
    canvas[36:, :a.shape[1]] = a
    canvas[36:, a.shape[1] + gap:] = b
    lo, hi = (float(cos.min()), float(cos.max())) if len(cos) else (0.0, 1.0)
    for (x1, y1), (x2, y2), c in zip(q_xy, k_xy, cos):
        t = 0.0 if hi <= lo else (float(c) - lo) / (hi - lo)
        colour = (int(255 * (1 - t)), int(200 * t + 55), 40)
        p1 = (int(x1 * sa), int(y1 * sa) + 36)
        p2 = (int(x2 * sb) + a.shape[1] + gap, int(y2 * sb) + 36)
        cv2.line(canvas, p1, p2, colour, 2, cv2.LINE_AA)
        cv2.circle(canvas, p1, 4, colour, -1, cv2.LINE_AA)
        cv2.circle(canvas, p2, 4, colour, -1, cv2.LINE_AA)
    cv2.putText(canvas, caption, (8, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (20, 20, 20), 1, cv2.LINE_AA)
    return canvas


def explain_png(model: GlobalModel, query: np.ndarray, db: np.ndarray, scales: Sequence[float] = (1.0,)) -> bytes:
    """PNG bytes explaining the match of ``query`` with ``db`` (both RGB uint8)."""
    try:
        from irkit.search import explain as project_explain  # the project's picture, when it exists
    except ImportError:
        project_explain = None
    fn = getattr(project_explain, "explain_png", None) if project_explain else None
    if fn is not None:
        try:
            return fn(model, query, db)
        except TypeError:
            log.debug("irkit.search.explain.explain_png has another signature; using the built-in picture")
    q_xy, k_xy, cos, prob = correspondences(model, query, db)
    canvas = draw(query, db, q_xy, k_xy, cos, f"P(same instance) = {prob:.3f}   {len(cos)} mutual matches")
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()

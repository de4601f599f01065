"""An HTML report of a revisitop evaluation: the E/M/H table, per-query AP bars, precision-recall
curves, and each query's top results marked positive / negative / ignored (Medium protocol).

Why a static HTML page with PNG files beside it: it opens anywhere (no server, no JavaScript), can
be attached to a PR or archived with the run, and the PNGs are reusable in papers. Thumbnails are
written once as small JPEGs so a report of 70 queries x 10 results stays a few MB.
"""
from __future__ import annotations

import html
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from irkit.errors import ImageError, RankingError
from irkit.io.images import crop_bbx, load_image
from irkit.eval.revisitop import DEFAULT_KAPPAS, PROTOCOLS, check_ranks, format_table, protocol_sets
from irkit.utils import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

#: Medium protocol marks: positive = easy ∪ hard, ignored = junk, everything else negative
MARK_COLOURS = {"positive": "#1a9c3e", "negative": "#d0312d", "ignored": "#9a9a9a"}
PROTOCOL_COLOURS = {"easy": "#4c9be8", "medium": "#f0a30a", "hard": "#8e44ad"}
THUMB_SIZE = 128


def write_report(results: dict, ranks: np.ndarray, gnd: Sequence[dict], dataset: Any,
                 out_html: str | os.PathLike, *, top: int = 10, title: str | None = None,
                 kappas: Sequence[int] = DEFAULT_KAPPAS, thumbnails: bool = True,
                 max_queries: int | None = None) -> Path:
    """Write ``out_html`` and its assets (``<stem>_files/``: plots and thumbnails); return the HTML path.

    ``results``: :func:`irkit.eval.revisitop.evaluate_ranks` output (percent, with per-query ``aps``).
    ``ranks``: ``[n_db, n_q]`` rankings (0-based database indices). ``gnd``: the ground truth list.
    ``dataset``: a :class:`~irkit.data.revisitop.RevisitopDataset` (names, image paths and query
    boxes are taken from it) or just a dataset name (then no thumbnails, indices as names).
    ``top``: results shown per query; ``thumbnails=False`` skips reading images;
    ``max_queries``: only the first N query sections (the table and plots always cover all).
    """
    ranks = check_ranks(np.asarray(ranks), n_queries=len(gnd))
    missing = [p for p in PROTOCOLS if p not in results or "aps" not in results[p]]
    if missing:
        raise RankingError(f"results lack protocol(s) {missing} or their per-query 'aps'; pass "
                           "evaluate_ranks(...) output")
    out_html = Path(out_html)
    assets = out_html.with_name(out_html.stem + "_files")
    assets.mkdir(parents=True, exist_ok=True)
    name = getattr(dataset, "name", None) or str(dataset)
    qnames = list(getattr(dataset, "qimlist", None) or [f"query {q}" for q in range(len(gnd))])
    dbnames = list(getattr(dataset, "imlist", None) or [])
    qpaths = list(getattr(dataset, "query_paths", None) or [])
    dbpaths = list(getattr(dataset, "db_paths", None) or [])
    qbbx = list(getattr(dataset, "query_bbx", None) or [])
    nq = len(gnd)

    _ap_bars(results, qnames, assets / "ap_per_query.png")
    curves = {p: [pr_curve(ranks[:, q], gnd[q], p) for q in range(nq)] for p in PROTOCOLS}
    _pr_plot(curves, assets / "precision_recall.png")

    rel = assets.name
    parts = [_HEAD.format(title=html.escape(title or f"irkit evaluation: {name}")),
             f"<h1>{html.escape(title or f'irkit evaluation: {name}')}</h1>",
             f"<p>{nq} queries, {ranks.shape[0]} database images; marks use the Medium protocol: "
             + ", ".join(f'<span class="sw" style="background:{c}"></span>{k}' for k, c in MARK_COLOURS.items())
             + "</p>", _table_html(results, kappas),
             f"<pre class='table'>{html.escape(format_table(results, kappas))}</pre>",
             "<h2>Average precision per query</h2>",
             f"<img class='plot' src='{rel}/ap_per_query.png' alt='AP per query (Easy, Medium, Hard)'>",
             "<h2>Precision-recall</h2>",
             f"<img class='plot' src='{rel}/precision_recall.png' alt='precision-recall curves per protocol'>",
             "<h2>Queries</h2>"]
    shown = nq if max_queries is None else min(nq, max_queries)
    for q in range(shown):
        parts.append(_query_section(q, ranks[:, q], gnd[q], results, qnames, dbnames, qpaths, dbpaths,
                                    qbbx, assets, rel, top, thumbnails))
    parts.append("</body></html>\n")
    atomic_write_text(out_html, "\n".join(parts))
    log.info("wrote report %s (%d queries)", out_html, nq)
    return out_html


# ------------------------------------------------------------------------------------- numbers

def pr_curve(ranking: np.ndarray, entry: dict, protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at each positive of one query's ranking, ignored images removed."""
    pos, ign = protocol_sets(entry, protocol)
    if len(pos) == 0:
        return np.zeros(0), np.zeros(0)
    inv = np.empty(len(ranking), dtype=np.int64)
    inv[np.asarray(ranking, dtype=np.int64)] = np.arange(len(ranking))
    p_pos = np.sort(inv[pos])
    p_ign = np.sort(inv[ign]) if len(ign) else np.zeros(0, np.int64)
    adjusted = p_pos - np.searchsorted(p_ign, p_pos)          # positions once ignored are removed
    hits = np.arange(1, len(pos) + 1, dtype=np.float64)
    return hits / len(pos), hits / (adjusted + 1.0)


def marks(ranking: np.ndarray, entry: dict, top: int, protocol: str = "medium") -> list[str]:
    """"positive" / "negative" / "ignored" for the first ``top`` entries of a ranking."""
    pos, ign = protocol_sets(entry, protocol)
    pos_set, ign_set = set(pos.tolist()), set(ign.tolist())
    return ["positive" if int(i) in pos_set else "ignored" if int(i) in ign_set else "negative"
            for i in ranking[:top]]


# ------------------------------------------------------------------------------------- plots

def _plt():
    import matplotlib  # lazy: matplotlib is slow to import and only reports draw

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)


def _ap_bars(results: dict, qnames: Sequence[str], path: Path) -> None:
    plt = _plt()
    nq = len(qnames)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * nq + 2), 3.6))
    x = np.arange(nq)
    width = 0.27
    for i, p in enumerate(PROTOCOLS):
        aps = np.nan_to_num(np.asarray(results[p]["aps"], dtype=np.float64), nan=0.0)
        ax.bar(x + (i - 1) * width, aps, width, label=f"{p} (mAP {results[p]['map']:.2f})",
               color=PROTOCOL_COLOURS[p])
    ax.set_xticks(x)
    ax.set_xticklabels([str(n)[:18] for n in qnames], rotation=90, fontsize=7)
    ax.set_ylabel("AP (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, ncol=3, loc="upper right")
    ax.set_title("AP per query (excluded queries shown as 0)")
    _save(fig, path)


def _pr_plot(curves: dict, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), sharey=True)
    for ax, p in zip(axes, PROTOCOLS):
        for rec, prec in curves[p]:
            if len(rec):
                ax.plot(np.concatenate([[0], rec]), np.concatenate([[prec[0]], prec]), lw=0.8, alpha=0.5)
        ax.set_title(p.capitalize())
        ax.set_xlabel("recall")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("precision")
    _save(fig, path)


# ------------------------------------------------------------------------------------- HTML

_HEAD = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>
body{{font:14px/1.4 system-ui,sans-serif;margin:1.5rem;color:#1d2330}} table.res{{border-collapse:collapse}}
table.res td,table.res th{{border:1px solid #ccd;padding:.25rem .6rem;text-align:right}}
.plot{{max-width:100%;border:1px solid #ddd}} .sw{{display:inline-block;width:.9em;height:.9em;margin:0 .25em 0 .6em;vertical-align:middle}}
.query{{border-top:1px solid #ccd;padding:.6rem 0}} .row{{display:flex;flex-wrap:wrap;gap:.4rem;align-items:flex-start}}
figure{{margin:0;text-align:center;font-size:11px;width:{size}px}} figure img{{max-width:{size}px;max-height:{size}px;border:4px solid transparent}}
figure.q img{{border-color:#1d2330}} .positive img{{border-color:#1a9c3e}} .negative img{{border-color:#d0312d}} .ignored img{{border-color:#9a9a9a}}
.noimg{{width:{size}px;height:60px;background:#eee;display:flex;align-items:center;justify-content:center}} pre.table{{color:#555}}
</style></head><body>""".replace("{size}", str(THUMB_SIZE))


def _table_html(results: dict, kappas: Sequence[int]) -> str:
    head = "<tr><th></th><th>mAP</th>" + "".join(f"<th>mP@{k}</th>" for k in kappas) + "</tr>"
    rows = []
    for p in PROTOCOLS:
        r = results[p]
        vals = [r["map"]] + [r.get(f"mp@{k}", math.nan) for k in kappas]
        rows.append(f"<tr><th>{p.capitalize()}</th>" + "".join(f"<td>{v:.2f}</td>" for v in vals) + "</tr>")
    return f"<table class='res' id='results-table'>{head}{''.join(rows)}</table>"


def write_thumbnail(path: Path | None, bbx, dest: Path, rel: str, enabled: bool) -> str | None:
    """Write a JPEG thumbnail (cropped to ``bbx`` for queries) once; the relative URL, or None."""
    if not enabled or path is None:
        return None
    if not dest.exists():
        try:
            img = load_image(path)
            if bbx is not None:
                img = crop_bbx(img, bbx)
        except ImageError as err:
            log.warning("report: no thumbnail for %s (%s)", path, err)
            return None
        pil = Image.fromarray(img)
        pil.thumbnail((THUMB_SIZE, THUMB_SIZE))
        with atomic_path(dest, suffix=".jpg") as tmp:
            pil.save(tmp, format="JPEG", quality=80)
    return f"{rel}/{dest.name}"


def figure_html(url: str | None, caption: str, cls: str) -> str:
    img = f"<img src='{html.escape(url)}' alt='{html.escape(caption)}'>" if url else \
        f"<div class='noimg'>{html.escape(caption)}</div>"
    return f"<figure class='{cls}'>{img}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _query_section(q: int, ranking: np.ndarray, entry: dict, results: dict, qnames, dbnames, qpaths, dbpaths,
                   qbbx, assets: Path, rel: str, top: int, thumbnails: bool) -> str:
    aps = " · ".join(f"{p[0].upper()} {_fmt_ap(results[p]['aps'][q])}" for p in PROTOCOLS)
    qurl = write_thumbnail(Path(qpaths[q]) if q < len(qpaths) else None, qbbx[q] if q < len(qbbx) else None,
                  assets / f"q{q:05d}.jpg", rel, thumbnails)
    cells = [figure_html(qurl, f"query: {qnames[q]}", "q")]
    for r, (i, mark) in enumerate(zip(ranking[:top], marks(ranking, entry, top))):
        i = int(i)
        url = write_thumbnail(Path(dbpaths[i]) if i < len(dbpaths) else None, None, assets / f"db{i:07d}.jpg", rel, thumbnails)
        name = dbnames[i] if i < len(dbnames) else f"#{i}"
        cells.append(figure_html(url, f"{r + 1}. {name} ({mark})", mark))
    return (f"<section class='query' id='q{q}'><h3>{q}. {html.escape(str(qnames[q]))} <small>AP {aps}</small></h3>"
            f"<div class='row'>{''.join(cells)}</div></section>")


def _fmt_ap(v: float) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{float(v):.2f}"

"""The learning curve of a run as a PNG: training loss from ``metrics.csv`` and, per evaluation,
the validation metrics of ``eval.csv`` (recipe validation such as AUC, revisitop mAP E/M/H).

Why a picture: a loss that stalls or a validation AUC that falls while the loss keeps dropping
(over-fitting) is seen at a glance, and the file sits next to the checkpoint it describes.
"""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

from irkit.utils import atomic_path

log = logging.getLogger(__name__)

#: eval.csv columns drawn (when present), on a 0-1 axis or a 0-100 axis
_RATE_COLUMNS = ("val_auc", "val_acc")
_MAP_COLUMNS = ("val_map", "easy", "medium", "hard")   # held-out-class mAP, revisitop protocols


def read_csv_columns(path: Path) -> dict[str, list[float]]:
    """Numeric columns of a metrics CSV (non-numeric cells become nan); {} when the file is absent."""
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    cols: dict[str, list[float]] = {}
    for row in rows:
        for k, v in row.items():
            try:
                x = float(v)
            except (TypeError, ValueError):
                x = float("nan")
            cols.setdefault(k, []).append(x)
    return cols


def plot_learning_curve(out_dir: str | Path, title: str = "", name: str = "learning_curve.png") -> Path | None:
    """Draw ``out_dir/learning_curve.png`` (written atomically); None when there is nothing to draw."""
    out_dir = Path(out_dir)
    train = read_csv_columns(out_dir / "metrics.csv")
    val = read_csv_columns(out_dir / "eval.csv")
    if not train.get("step"):
        return None
    # matplotlib is imported here, not at module top: it costs about a second and only runs that draw
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [c for c in _RATE_COLUMNS if c in val]
    maps = [c for c in _MAP_COLUMNS if c in val]
    panels = 1 + bool(rates) + bool(maps)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    ax.plot(train["step"], train["loss"], label="train loss", color="tab:blue")
    if "val_loss" in val:
        ax.plot(val["step"], val["val_loss"], "o-", label="validation loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    i = 1
    if rates:
        ax = axes[0][i]
        for c in rates:
            ax.plot(val["step"], val[c], "o-", label=c.replace("val_", "validation "))
        ax.set_ylim(0, 1)
        ax.set_xlabel("step")
        ax.legend(loc="best")
        ax.grid(alpha=0.3)
        i += 1
    if maps:
        ax = axes[0][i]
        for c in maps:
            if any(not math.isnan(v) for v in val[c]):
                ax.plot(val["step"], val[c], "o-", label="validation mAP" if c == "val_map" else f"mAP {c}")
        ax.set_xlabel("step")
        ax.set_ylabel("mAP (%)")
        ax.legend(loc="best")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = out_dir / name
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    log.info("learning curve: %s", path)
    return path

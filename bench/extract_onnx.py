"""onnxruntime (fp32, int8) rows for bench/extract.py, and the int8 mAP cost on minidev.

    python bench/extract_onnx.py [--images 12] [--minidev] [--calib 16]

bench/extract.py can call :func:`onnx_rows` with the model, images and its eager-loop speed; run
alone, this file measures torch eager (batch-1 loop) vs irkit extraction with torch, onnxruntime
fp32 and onnxruntime int8 (static QDQ) on generated JPEGs, and with ``--minidev`` the mAP of the
three on minidev (irkit.pipeline.evaluate_dataset, cache in a temporary folder).
"""
from __future__ import annotations

import argparse
import random
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from irkit.export import OnnxModel, calibration_inputs, export_onnx, quantize_int8, set_runtime  # noqa: E402
from irkit.extract import Item, extract_to_store  # noqa: E402
from irkit.io.images import load_image  # noqa: E402

SCALES = (0.7071, 1.0, 1.4142)
MINIDEV = Path(__file__).resolve().parents[2] / "shared/assets/datasets"
POOL = Path(__file__).resolve().parents[2] / "shared/assets/train/real-multiview"  # calibration: never minidev


def onnx_models(model: Any, workdir: Path, calib_paths: Sequence[Path]) -> dict[str, OnnxModel]:
    """fp32 export of ``model`` and its int8 (static QDQ, calibrated on ``calib_paths`` at SCALES)."""
    fp32 = export_onnx(model, workdir / f"{model.preset_name}.onnx")
    calib = calibration_inputs(model, [load_image(p) for p in calib_paths], SCALES)
    int8 = quantize_int8(fp32, workdir / f"{model.preset_name}-int8.onnx", calib)
    return {"onnx-fp32": OnnxModel(fp32), "onnx-int8": OnnxModel(int8)}


def _extract(model: Any, paths: Sequence[Path], store: Path, optimize: bool) -> tuple[float, np.ndarray]:
    from extract import warm_up

    if not getattr(model, "is_onnx", False):
        set_runtime(model, "torch")   # the torch row: irkit's default would pick onnxruntime itself
    warm_up(model, paths[0])          # every row's one-time set-up stays out of its timing
    t0 = time.perf_counter()
    s = extract_to_store(model, [Item(p.stem, str(p)) for p in paths], store, scales=SCALES, dtype="float32",
                         progress=False, batch_size=8, optimize=optimize)
    dt = time.perf_counter() - t0
    return dt, np.asarray(s.descriptors())[[s.index_of(p.stem) for p in paths]]


def onnx_rows(model: Any, paths: Sequence[Path], workdir: Path, eager_img_s: float,
              calib_paths: Sequence[Path] | None = None) -> list[dict]:
    """Rows {model, runtime, img_s, ratio (vs torch eager), min_cos (vs irkit torch)} for
    irkit-torch, onnxruntime fp32 and int8 extraction of ``paths`` (same scales as bench/extract.py).

    Hook in bench/extract.py (inside its temporary directory, after the effnet row)::

        from extract_onnx import onnx_rows, print_rows
        print_rows(onnx_rows(model, paths, tmp, rows[0]["plain_img_s"]))
    """
    workdir = Path(workdir)
    models = onnx_models(model, workdir, calib_paths or paths[: min(8, len(paths))])
    from extract import model_gflop

    gflop = model_gflop(model, paths)
    t_torch, ref = _extract(model, paths, workdir / "onnxbench-torch", True)
    set_runtime(model, "auto")
    rows = [{"model": model.preset_name, "runtime": "irkit torch", "img_s": len(paths) / t_torch,
             "ratio": len(paths) / t_torch / eager_img_s, "min_cos": 1.0, "gflops": gflop / t_torch}]
    for name, m in models.items():
        dt, got = _extract(m, paths, workdir / f"onnxbench-{name}", False)
        rows.append({"model": model.preset_name, "runtime": name, "img_s": len(paths) / dt,
                     "ratio": len(paths) / dt / eager_img_s, "min_cos": float((ref * got).sum(1).min()),
                     "gflops": gflop / dt})
    return rows


def print_rows(rows: Sequence[dict], peak: float | None = None) -> None:
    """``peak``: the fp32 matmul peak measured in the same run (GFLOP/s; int8 rows can pass it)."""
    print(f"{'model':22s} {'runtime':12s} {'img/s':>8s} {'x eager':>8s} {'GFLOP/s':>8s} {'% peak':>7s} "
          f"{'min cos vs torch':>17s}")
    for r in rows:
        pk = f"{100 * r['gflops'] / peak:6.1f}%" if peak else "      -"
        print(f"{r['model']:22s} {r['runtime']:12s} {r['img_s']:8.2f} {r['ratio']:8.2f} {r['gflops']:8.1f} {pk} "
              f"{r['min_cos']:17.6f}")
    if any(r["runtime"] == "onnx-int8" for r in rows):
        print("int8 is never irkit's default: its accuracy cost is measured with `python bench/extract_onnx.py "
              "--minidev` (last measured: minidev Easy -10.7 for effnetlite2-gem, see README)")


def minidev_maps(model: Any, models: dict[str, OnnxModel], cache: Path) -> dict[str, dict]:
    """mAP E/M/H on minidev of the torch model and each OnnxModel (evaluate_dataset, cached in ``cache``)."""
    from irkit.pipeline import evaluate_dataset

    out = {"torch": evaluate_dataset(MINIDEV, "minidev", model, cache_dir=cache, progress=False).results}
    for name, m in models.items():
        out[name] = evaluate_dataset(MINIDEV, "minidev", m, cache_dir=cache, progress=False).results
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="effnetlite2-gem")
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--minidev", action="store_true", help="also measure mAP E/M/H on minidev")
    ap.add_argument("--calib", type=int, default=32, help="training-pool photos (not minidev) that calibrate int8, "
                    "at every test scale")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from _machine import machine_report, matmul_peak
    from extract import make_images, plain_loop

    print(machine_report())
    peak = matmul_peak(torch.get_num_threads())

    from irkit.models.registry import build_model

    model = build_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "img").mkdir()
        paths = make_images(tmp / "img", args.images, (800, 600))
        pool = sorted(POOL.rglob("*.jpg"))
        random.Random(0).shuffle(pool)
        calib = pool[:args.calib] if pool else paths[:8]
        t0 = time.perf_counter()
        plain_loop(model, paths)
        eager = len(paths) / (time.perf_counter() - t0)
        print(f"{args.model}: torch eager batch-1 loop {eager:.2f} img/s over {len(paths)} images, scales {SCALES}")
        rows = onnx_rows(model, paths, tmp, eager, calib)
        print_rows(rows, peak)
        if args.minidev:
            models = {"onnx-fp32": OnnxModel(tmp / f"{model.preset_name}.onnx"),
                      "onnx-int8": OnnxModel(tmp / f"{model.preset_name}-int8.onnx")}
            maps = minidev_maps(model, models, tmp / "cache")
            print(f"minidev mAP E / M / H (int8 calibrated on {len(calib)} training-pool photos at every scale, "
                  "convolutions and matmuls quantized)")
            for name, res in maps.items():
                print(f"  {name:10s} " + " / ".join(f"{res[p]['map']:.2f}" for p in ("easy", "medium", "hard")))
            base = maps["torch"]
            for name in ("onnx-fp32", "onnx-int8"):
                print(f"  {name} - torch: " + " / ".join(f"{maps[name][p]['map'] - base[p]['map']:+.2f}"
                                                        for p in ("easy", "medium", "hard")))
    return 0


if __name__ == "__main__":
    sys.exit(main())

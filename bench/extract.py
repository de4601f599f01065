"""Extraction throughput: irkit's extraction vs a plain eager loop, measured in the same run.

    python bench/extract.py [--images 24] [--quick] [--onnx]

For each model (effnetlite2-gem at max side 448 with its real ImageNet weights when installed,
resnet50-gem at 1024 px with random weights), both paths extract the same generated JPEGs at the
same scales (0.7071, 1, 1.4142): the plain loop decodes, resizes and runs the network one image and
one scale at a time (batch 1); irkit uses `extract_to_store` (threaded decoding, same-shape
batching) twice: with ``--runtime torch`` (BatchNorm folded, channels-last) and with irkit's
default runtime (``auto``: onnxruntime where it was measured faster, see irkit.export). Each row
prints images/s, the ratio to the plain loop, the max descriptor difference, and the GFLOP/s
reached against the fp32 matmul peak measured in the same run. The machine's load is printed
first and last, with a loud warning when other processes use the cores (bench/_machine.py). ``--onnx`` adds
onnxruntime fp32 and int8 rows for effnetlite2-gem (bench/extract_onnx.py; `--minidev` there adds
the int8 mAP change).
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from _machine import machine_report, matmul_peak
from irkit.export import runtime_of, set_runtime
from irkit.extract import Item, embed_arrays, extract_to_store, reduce_scales, scaled_inputs
from irkit.io.images import load_image
from irkit.models.registry import build_model

SCALES = (0.7071, 1.0, 1.4142)


def make_images(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    """Photo-like JPEGs (smooth colour fields + edges), two orientations."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        w, h = size if i % 3 else size[::-1]
        low = rng.random((h // 32 + 2, w // 32 + 2, 3))
        img = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC))
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        path = folder / f"img{i:04d}.jpg"
        Image.fromarray(img).save(path, quality=90)
        paths.append(path)
    return paths


def plain_loop(model, paths: list[Path]) -> np.ndarray:
    """The straightforward version: one image, one scale, one forward at a time."""
    out = []
    with torch.no_grad():
        for p in paths:
            per_scale = [F.normalize(model(x[None]), dim=-1) for x in scaled_inputs(model, load_image(p), SCALES)]
            out.append(reduce_scales(torch.stack(per_scale), model.scale_reduce)[0].numpy())
    return np.stack(out)


def model_gflop(model, paths: list[Path]) -> float:
    """FLOPs of the network over all images and scales (counted by torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        for p in paths:
            for x in scaled_inputs(model, load_image(p), SCALES):
                model(x[None])
    return counter.get_total_flops() / 1e9


def bench(name: str, model, paths: list[Path], workdir: Path, peak: float) -> list[dict]:
    """Rows: the plain loop, irkit with torch, irkit with its default runtime (same images)."""
    gflop = model_gflop(model, paths)
    t0 = time.perf_counter()
    ref = plain_loop(model, paths)
    t_plain = time.perf_counter() - t0
    rows = [{"model": name, "path": "plain eager loop", "img_s": len(paths) / t_plain, "ratio": 1.0,
             "max_diff": 0.0, "gflops": gflop / t_plain, "peak": peak}]
    for runtime in ("torch", "auto"):
        set_runtime(model, runtime)
        label = f"irkit --runtime {runtime}" + (f" ({runtime_of(model)})" if runtime == "auto" else "")
        first_use = warm_up(model, paths[0])
        t0 = time.perf_counter()
        store = extract_to_store(model, [Item(p.stem, str(p)) for p in paths], workdir / f"store-{name}-{runtime}",
                                 scales=SCALES, dtype="float32", progress=False, batch_size=8)
        dt = time.perf_counter() - t0
        got = np.asarray(store.descriptors())[[store.index_of(p.stem) for p in paths]]
        rows.append({"model": name, "path": label, "img_s": len(paths) / dt, "ratio": t_plain / dt,
                     "max_diff": float(np.abs(ref - got).max()), "min_cos": float((ref * got).sum(1).min()),
                     "gflops": gflop / dt, "peak": peak, "first_use_s": first_use})
    set_runtime(model, "auto")
    return rows


def warm_up(model, path: Path) -> float:
    """Seconds of the runtime's one-time set-up (onnxruntime: export or load of the cached export,
    session, first-use check against torch), paid before timing: the onnxruntime rows of
    bench/extract_onnx.py build their sessions before timing too, and a long extraction pays it once."""
    t0 = time.perf_counter()
    embed_arrays(model, [load_image(path)], [1.0])
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--quick", action="store_true", help="6 images per model (smoke run)")
    ap.add_argument("--onnx", action="store_true", help="add onnxruntime fp32/int8 rows for effnetlite2-gem")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    n = 6 if args.quick else args.images
    print(machine_report())
    peak = matmul_peak(torch.get_num_threads())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "a").mkdir()
        (tmp / "b").mkdir()
        effnet, effnet_paths = build_model("effnetlite2-gem"), make_images(tmp / "a", n, (800, 600))
        rows += bench("effnetlite2-gem@448", effnet, effnet_paths, tmp, peak)
        onnx = []
        if args.onnx:
            from extract_onnx import onnx_rows

            onnx = onnx_rows(effnet, effnet_paths, tmp, rows[0]["img_s"])
        torch.manual_seed(0)
        rows += (bench("resnet50-gem@1024", build_model("resnet50-gem"), make_images(tmp / "b", n, (1024, 768)),
                          tmp, peak))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, matmul peak {peak:.1f} GFLOP/s, "
          f"{n} images per model, scales {SCALES}")
    print(f"{'model':22s} {'path':32s} {'img/s':>7s} {'ratio':>6s} {'GFLOP/s':>8s} {'% peak':>7s} "
          f"{'max |diff|':>10s} {'min cos':>9s} {'first use':>9s}")
    for r in rows:
        first = f"{r['first_use_s']:8.1f}s" if "first_use_s" in r else f"{'-':>9s}"
        print(f"{r['model']:22s} {r['path']:32s} {r['img_s']:7.2f} {r['ratio']:6.2f} {r['gflops']:8.1f} "
              f"{100 * r['gflops'] / r['peak']:6.1f}% {r['max_diff']:10.2e} {r.get('min_cos', 1.0):9.6f} {first}")
    print("first use: the runtime's one-time set-up (onnxruntime: load or export, session, check against torch), "
          "paid before the timed extraction")
    if onnx:
        from extract_onnx import print_rows

        print_rows(onnx, peak)
    print(machine_report())
    return 0


if __name__ == "__main__":
    sys.exit(main())

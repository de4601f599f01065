"""Extraction throughput: irkit's extraction vs a plain eager loop, measured in the same run.

    python bench/extract.py [--images 24] [--quick] [--onnx]

For each model (effnetlite2-gem at max side 448 with its real ImageNet weights when installed,
resnet50-gem at 1024 px with random weights), both paths extract the same generated JPEGs at the
same scales (0.7071, 1, 1.4142): the plain loop decodes, resizes and runs the network one image and
one scale at a time (batch 1); irkit uses `extract_to_store` (threaded decoding, BatchNorm folded,
channels-last, same-shape batching). It prints images/s, the ratio, the max descriptor difference,
and the GFLOP/s reached against this machine's matmul peak measured here. ``--onnx`` adds
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

from irkit.extract import Item, extract_to_store, reduce_scales, scaled_inputs
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


def matmul_peak_gflops(seconds: float = 2.0) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        n += 1
    return 2 * 2048 ** 3 * n / (time.perf_counter() - t0) / 1e9


def model_gflop(model, paths: list[Path]) -> float:
    """FLOPs of the network over all images and scales (counted by torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        for p in paths:
            for x in scaled_inputs(model, load_image(p), SCALES):
                model(x[None])
    return counter.get_total_flops() / 1e9


def bench(name: str, model, paths: list[Path], workdir: Path, peak: float) -> dict:
    t0 = time.perf_counter()
    ref = plain_loop(model, paths)
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    store = extract_to_store(model, [Item(p.stem, str(p)) for p in paths], workdir / f"store-{name}",
                             scales=SCALES, dtype="float32", progress=False, batch_size=8)
    t_irkit = time.perf_counter() - t0
    got = np.asarray(store.descriptors())[[store.index_of(p.stem) for p in paths]]
    gflop = model_gflop(model, paths)
    return {"model": name, "plain_img_s": len(paths) / t_plain, "irkit_img_s": len(paths) / t_irkit,
            "ratio": t_plain / t_irkit, "max_diff": float(np.abs(ref - got).max()),
            "gflops_irkit": gflop / t_irkit, "peak": peak}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--quick", action="store_true", help="6 images per model (smoke run)")
    ap.add_argument("--onnx", action="store_true", help="add onnxruntime fp32/int8 rows for effnetlite2-gem")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    n = 6 if args.quick else args.images
    peak = matmul_peak_gflops()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "a").mkdir()
        (tmp / "b").mkdir()
        effnet, effnet_paths = build_model("effnetlite2-gem"), make_images(tmp / "a", n, (800, 600))
        rows.append(bench("effnetlite2-gem@448", effnet, effnet_paths, tmp, peak))
        onnx = []
        if args.onnx:
            from extract_onnx import onnx_rows

            onnx = onnx_rows(effnet, effnet_paths, tmp, rows[0]["plain_img_s"])
        torch.manual_seed(0)
        rows.append(bench("resnet50-gem@1024", build_model("resnet50-gem"), make_images(tmp / "b", n, (1024, 768)),
                          tmp, peak))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, matmul peak {peak:.1f} GFLOP/s, "
          f"{n} images per model, scales {SCALES}")
    print(f"{'model':22s} {'plain img/s':>11s} {'irkit img/s':>11s} {'ratio':>6s} {'GFLOP/s':>8s} "
          f"{'% peak':>7s} {'max |diff|':>10s}")
    for r in rows:
        print(f"{r['model']:22s} {r['plain_img_s']:11.2f} {r['irkit_img_s']:11.2f} {r['ratio']:6.2f} "
              f"{r['gflops_irkit']:8.1f} {100 * r['gflops_irkit'] / r['peak']:6.1f}% {r['max_diff']:10.2e}")
    if onnx:
        from extract_onnx import print_rows

        print_rows(onnx)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`irkit export`: a model preset's one-scale descriptor as ONNX (dynamic batch/height/width),
checked against torch with onnxruntime; optionally an int8 copy (static QDQ with calibration
images, or dynamic)."""
from __future__ import annotations

import argparse
from pathlib import Path

from irkit.cli.common import add_model_args, model_from_args
from irkit.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model to ONNX (+ optional int8)",
                       description="Export MODEL(x), the one-scale L2-normalised descriptor, to ONNX with "
                       "dynamic batch/height/width; onnxruntime's outputs are checked against torch.")
    p.add_argument("--onnx", type=Path, required=True, help="output .onnx file")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17, default 17)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime vs torch comparison")
    p.add_argument("--int8", type=Path, help="also write an int8-quantized copy here")
    p.add_argument("--calib", help="folder or .txt/.csv list of calibration images for static int8 "
                   "(without it: dynamic, weights-only quantization)")
    p.add_argument("--calib-count", type=int, default=32, help="calibration images to use (default 32)")
    add_model_args(p)
    p.set_defaults(func=run)


#: the measured cost (README Benchmarks; `python bench/extract_onnx.py --minidev`)
INT8_MEASURED_COST = ("minidev mAP Easy -10.7, Medium +0.3, Hard +2.9 against fp32 (effnetlite2-gem, static QDQ "
                      "of the convolutions, 32 training-pool photos at 3 scales); Easy has 7 queries: one changed")


def run(args: argparse.Namespace) -> int:
    from irkit.export import calibration_inputs, export_onnx, quantize_int8

    model = model_from_args(args)
    path = export_onnx(model.cpu(), args.onnx, opset=args.opset, check=not args.no_check)
    print(f"{path}: {model.preset_name} ({model.dim}-D), dynamic batch/height/width, opset {args.opset}")
    if args.int8:
        calib = None
        if args.calib:
            from irkit.data.collection import load_collection
            from irkit.io.images import load_image

            col = load_collection(args.calib)
            if not col.paths:
                raise ConfigError(f"--calib {args.calib} holds no images")
            images = [load_image(p) for p in list(col.paths)[:args.calib_count]]
            calib = calibration_inputs(model, images, args.scales)
        out = quantize_int8(path, args.int8, calib)
        print(f"{out}: int8 ({'static QDQ, %d calibration inputs' % len(calib) if calib else 'dynamic'})")
        print(f"int8 costs accuracy: {INT8_MEASURED_COST}; check it on your data (`irkit eval --model ... "
              "--weights model.int8.onnx`) before using it; irkit never chooses int8 by itself")
    return 0

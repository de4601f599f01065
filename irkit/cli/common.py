"""Argument groups shared by several commands (model selection, scales, device)."""
from __future__ import annotations

import argparse

from irkit.errors import ConfigError
from irkit.export import RUNTIMES, set_runtime
from irkit.models.base import GlobalModel

DEFAULT_MODEL = "effnetlite2-gem"


def add_model_args(parser: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default, help=f"model preset (default {default}); see `irkit models`")
    group.add_argument("--weights", help="checkpoint: published layout (.pth/.pyth) or irkit (.safetensors)")
    group.add_argument("--allow-partial", action="store_true",
                       help="load the tensors that fit and list the skipped ones instead of refusing")
    group.add_argument("--scales", type=parse_scales, help="comma-separated scales, e.g. 0.7071,1,1.4142 "
                       "(default: the preset's)")
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")


def add_runtime_arg(parser: argparse.ArgumentParser) -> None:
    """``--runtime auto|torch|onnx`` (see irkit.export.set_runtime)."""
    parser.add_argument("--runtime", choices=["auto", "torch", "onnx"], default="auto",
                        help="how the model runs on CPU: auto (default) = the fastest measured for this preset, "
                        "onnxruntime for effnetlite*/resnet*-gem (exported once, cached, checked against torch), "
                        "torch otherwise; torch; onnx")


def parse_scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in text.replace(" ", "").split(",") if s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"scales must be comma-separated numbers, got {text!r}") from None
    if not scales or any(s <= 0 for s in scales):
        raise argparse.ArgumentTypeError(f"scales must be positive, got {text!r}")
    return scales


def model_from_args(args: argparse.Namespace) -> GlobalModel:
    from irkit.models.registry import build_model

    if not args.model:
        raise ConfigError("no model given: pass --model PRESET")
    model = build_model(args.model, weights=args.weights, allow_partial=args.allow_partial, device=args.device)
    runtime = getattr(args, "runtime", None)
    if runtime in RUNTIMES:
        set_runtime(model, runtime)
    return model

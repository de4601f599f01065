"""ONNX export of a model's one-scale descriptor, an onnxruntime-backed model, and int8 quantization.

Why: on CPU-only machines onnxruntime is usually faster than eager torch, and an ONNX file runs
where torch is not installed. The exported graph is exactly ``model(x)`` (one scale, L2-normalised
descriptor) with dynamic batch/height/width; multi-scale, resizing and normalisation stay in
:mod:`irkit.extract`, so an :class:`OnnxModel` plugs into the same extraction code (pass
``optimize=False`` to ``extract_to_store``: there is no torch module to fold).

The model's conventions (input spec, default scales, scale reduction, dim, preset name, weights
id) travel inside the file as ``metadata_props`` (key ``irkit``), so an .onnx file is
self-describing. Export rewrites GeM's ``avg_pool2d`` over the whole map (a kernel size that
depends on the input size, which the TorchScript exporter cannot keep dynamic) into the
equivalent mean over H and W.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from irkit.errors import ConfigError, IrkitError
from irkit.io.images import InputSpec
from irkit.models.base import GlobalModel

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "descriptors"
DEFAULT_OPSET = 17
META_KEY = "irkit"
#: (height, width) inputs the export is checked at
CHECK_SIZES = ((224, 224), (160, 288))


class ExportError(IrkitError):
    """Export failed, or the exported graph does not reproduce the torch model."""


class _MeanGeM(nn.Module):
    """GeM as mean over H, W (dynamic-shape friendly); same numbers as irkit.nn.pooling.GeM."""

    def __init__(self, p: Tensor, eps: float) -> None:
        super().__init__()
        self.register_buffer("p", p.detach().clone().reshape(-1))
        self.eps = eps
        self.scalar = p.numel() == 1  # decided here, not while tracing

    def forward(self, x: Tensor) -> Tensor:
        p = self.p[0] if self.scalar else self.p.view(1, -1, 1, 1)
        return x.clamp(min=self.eps).pow(p).mean(dim=(-2, -1), keepdim=True).pow(1.0 / p).flatten(1)


def exportable(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with export-hostile modules replaced by equivalents."""
    from irkit.nn.pooling import GeM

    out = copy.deepcopy(model).eval().cpu()
    for parent in list(out.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, GeM):
                parent._modules[name] = _MeanGeM(child.p, child.eps)
    return out


def model_metadata(model: GlobalModel, **extra: Any) -> dict[str, Any]:
    """What an OnnxModel needs to behave like ``model`` in irkit.extract."""
    meta = {"preset": model.preset_name, "dim": int(model.dim), "default_scales": list(model.default_scales),
            "scale_reduce": model.scale_reduce, "input_spec": asdict(model.input_spec),
            "weights_id": getattr(model, "weights_id", "unknown"), "describe": model.describe(),
            "quantization": None}
    meta.update(extra)
    return meta


def export_onnx(model: GlobalModel, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                example_size: tuple[int, int] = (224, 224), check: bool = True,
                check_sizes: Sequence[tuple[int, int]] = CHECK_SIZES, tol: float = 1e-4) -> Path:
    """Export ``model(x)`` ([B,3,H,W] -> [B,dim]) to ``path`` with dynamic batch, height and width.

    With ``check``, onnxruntime's descriptors must match torch's within ``1 - cosine <= tol`` at
    every size in ``check_sizes`` (ExportError otherwise). Written atomically."""
    import onnx

    from irkit.utils import atomic_path

    if opset < 17:
        raise ConfigError(f"ONNX opset must be >= 17, got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = exportable(model)
    x = torch.randn(1, 3, *example_size, generator=torch.Generator().manual_seed(0))
    with atomic_path(path, suffix=".tmp") as tmp:
        with torch.no_grad():
            torch.onnx.export(net, (x,), str(tmp), opset_version=opset, dynamo=False,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                                            OUTPUT_NAME: {0: "batch"}})
        proto = onnx.load(str(tmp))
        _set_metadata(proto, model_metadata(model))
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    log.info("exported %s to %s (opset %d)", model.preset_name, path, opset)
    if check:
        worst = compare_with_torch(model, path, check_sizes)
        if 1.0 - worst > tol:
            raise ExportError(f"ONNX descriptors of {path} differ from torch: min cosine {worst:.6f} "
                              f"(tolerance 1 - {tol})")
        log.info("onnxruntime matches torch: min cosine %.7f over sizes %s", worst, list(check_sizes))
    return path


def _set_metadata(proto: Any, meta: dict[str, Any]) -> None:
    for prop in list(proto.metadata_props):
        if prop.key == META_KEY:
            proto.metadata_props.remove(prop)
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)


def compare_with_torch(model: GlobalModel, path: str | os.PathLike,
                       sizes: Sequence[tuple[int, int]] = CHECK_SIZES, batch: int = 2) -> float:
    """Smallest cosine between torch and onnxruntime descriptors of random inputs at ``sizes``."""
    onnx_model = OnnxModel(path)
    worst = 1.0
    gen = torch.Generator().manual_seed(1)
    device = next(model.parameters()).device
    for h, w in sizes:
        x = torch.randn(batch, 3, h, w, generator=gen)
        with torch.inference_mode():
            ref = model(x.to(device)).float().cpu()
        got = onnx_model(x)
        cos = torch.nn.functional.cosine_similarity(ref, got, dim=-1)
        worst = min(worst, float(cos.min()))
    return worst


class OnnxModel(GlobalModel):
    """A GlobalModel whose forward runs an exported .onnx file with onnxruntime on CPU.

    Carries the conventions of the model it was exported from (input_spec, default_scales,
    scale_reduce, dim, preset_name), so ``irkit.extract`` treats it like the torch model.
    ``describe()`` adds the runtime and quantization, so its stores never mix with torch's."""

    is_onnx = True

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"ONNX file {self.path} not found; create it with `irkit export --onnx`")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ConfigError(f"onnxruntime cannot load {self.path}: {exc}") from exc
        raw = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        if raw is None:
            raise ConfigError(f"{self.path} has no irkit metadata; export it with `irkit export --onnx`")
        self.meta = json.loads(raw)
        self.input_spec = InputSpec(**{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in self.meta["input_spec"].items()})
        self.default_scales = tuple(float(s) for s in self.meta["default_scales"])
        self.scale_reduce = self.meta["scale_reduce"]
        self.dim = int(self.meta["dim"])
        self.preset_name = self.meta["preset"]
        self.weights_id = f"{self.meta['weights_id']}|onnx:{_file_sha(self.path)[:16]}"
        # embed_tensors asks the first parameter for the device: an empty CPU anchor answers it
        self._anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def __deepcopy__(self, memo: dict) -> "OnnxModel":
        """Inference-only and immutable: a copy (e.g. by optimize_for_inference) is the same model."""
        return self

    def forward(self, x: Tensor) -> Tensor:
        arr = np.ascontiguousarray(x.detach().cpu().float().numpy())
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: arr})[0]
        return torch.from_numpy(out)

    def describe(self) -> dict[str, Any]:
        out = dict(self.meta.get("describe") or super().describe())
        out.update(runtime="onnxruntime", quantization=self.meta.get("quantization"))
        return out


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------- int8
def calibration_inputs(model: GlobalModel, images: Iterable[np.ndarray],
                       scales: Sequence[float] | None = None) -> list[np.ndarray]:
    """Network inputs [1,3,H,W] float32 of uint8 RGB images at each scale (what extraction feeds)."""
    from irkit.extract import check_scales, scaled_inputs

    scales = check_scales(scales, model)
    return [t[None].numpy() for img in images for t in scaled_inputs(model, img, scales)]


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, calibration: Sequence[np.ndarray] | None = None,
                  *, per_channel: bool = True) -> Path:
    """int8 copy of an exported model: static QDQ (activations calibrated on ``calibration``,
    a list of [1,3,H,W] inputs, MinMax; weights per channel) or, without calibration, dynamic
    (weights only). The irkit metadata is kept, with ``quantization`` recorded."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from irkit.utils import atomic_path

    src, dst = Path(src), Path(dst)
    meta = json.loads(OnnxModel(src).session.get_modelmeta().custom_metadata_map[META_KEY])
    with atomic_path(dst, suffix=".tmp") as tmp:
        pre = dst.with_name(dst.name + ".pre.onnx")
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception as exc:  # pre-processing is an optimisation; quantize the original instead
            log.warning("onnxruntime quantization pre-processing failed (%s); quantizing the original graph", exc)
            pre.write_bytes(src.read_bytes())
        if calibration:
            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self.it = iter(calibration)

                def get_next(self):
                    x = next(self.it, None)
                    return None if x is None else {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)}

            quantize_static(str(pre), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
            kind = {"mode": "static-qdq", "calibration_inputs": len(calibration), "per_channel": per_channel}
        else:
            quantize_dynamic(str(pre), str(tmp), weight_type=QuantType.QUInt8)
            kind = {"mode": "dynamic"}
        pre.unlink(missing_ok=True)
        proto = onnx.load(str(tmp))
        meta["quantization"] = kind
        _set_metadata(proto, meta)
        onnx.save(proto, str(tmp))
    log.info("wrote %s quantized model %s", kind["mode"], dst)
    return dst


# ---------------------------------------------------------------------------- CLI helper
def onnx_model_from_args(args: argparse.Namespace) -> OnnxModel:
    """``--runtime onnx``: ``--weights FILE.onnx``, or the ``--model`` preset (with ``--weights``)
    exported once to ``<cache>/onnx/<preset>-<hash>.onnx`` and reused."""
    weights = getattr(args, "weights", None)
    if weights and str(weights).endswith(".onnx"):
        return OnnxModel(weights)
    from irkit.models.registry import build_model
    from irkit.utils import cache_root

    if str(getattr(args, "device", "cpu")) not in ("cpu", "auto"):
        log.warning("--runtime onnx runs on CPU (onnxruntime); --device %s is ignored", args.device)
    model = build_model(args.model, weights=weights, allow_partial=getattr(args, "allow_partial", False),
                        device="cpu")
    tag = hashlib.sha256(json.dumps(model_metadata(model), sort_keys=True).encode()).hexdigest()[:12]
    path = cache_root(getattr(args, "cache_dir", None)) / "onnx" / f"{model.preset_name}-{tag}.onnx"
    if not path.is_file():
        export_onnx(model, path)
    return OnnxModel(path)

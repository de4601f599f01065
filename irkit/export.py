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

import copy
import hashlib
import json
import logging
import os
import threading
import weakref
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
    from irkit.io.images import resize_max_side, resize_scale, to_tensor

    spec = model.input_spec
    scales = tuple(scales) if scales else tuple(model.default_scales)
    out = []
    for img in images:
        if spec.max_side:  # as irkit.extract.scaled_inputs (not imported: extract imports this module)
            img = resize_max_side(img, spec.max_side, spec.interp_down, spec.interp_up)
        out += [to_tensor(resize_scale(img, s, spec.interp_down, spec.interp_up), spec)[None].numpy() for s in scales]
    return out


#: ops quantized by default: the convolutions and matmuls; pooling (GeM's x^p and mean), the
#: normalisation and the head stay float, where int8 rounding changes rankings most
INT8_OPS = ("Conv", "MatMul", "Gemm")


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, calibration: Sequence[np.ndarray] | None = None,
                  *, per_channel: bool = True, op_types: Sequence[str] | None = INT8_OPS) -> Path:
    """int8 copy of an exported model: static QDQ (activations calibrated on ``calibration``,
    a list of [1,3,H,W] inputs, MinMax; weights per channel) or, without calibration, dynamic
    (weights only); only ``op_types`` are quantized (None: every op onnxruntime can). The irkit
    metadata is kept, with ``quantization`` recorded."""
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
                            weight_type=QuantType.QInt8,
                            op_types_to_quantize=list(op_types) if op_types is not None else None)
            kind = {"mode": "static-qdq", "calibration_inputs": len(calibration), "per_channel": per_channel,
                    "op_types": list(op_types) if op_types is not None else "all"}
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
# ---------------------------------------------------------------------------- runtime choice
#: runtimes ``--runtime`` accepts; "auto" = the fastest one measured for the model's family
RUNTIMES = ("auto", "torch", "onnx")
#: preset families onnxruntime fp32 runs faster than irkit's torch path on CPU (bench/extract.py,
#: same run: effnetlite2-gem@448 and resnet50-gem@1024; ResNet-101 shares the ResNet graph). CVNet
#: presets stay on torch: their extraction also needs the torch stage-3 map, and their parity tests
#: hold descriptors to 4e-8 of the published code.
ONNX_FASTER_FAMILIES = ("effnetlite0-gem", "effnetlite1-gem", "effnetlite2-gem", "resnet50-gem", "resnet101-gem")
#: descriptors of the chosen runtime must be this close to torch fp32 (1 - cosine)
RUNTIME_TOL = 1e-4
#: how the exported graph treats input sizes (part of the cache key)
SIZE_POLICY = "dynamic-hw"
_RUNNERS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Any]]" = weakref.WeakKeyDictionary()   # (weights_stamp, runner)
_RUNNERS_LOCK = threading.Lock()


def set_runtime(model: nn.Module, runtime: str) -> nn.Module:
    """Choose how ``model``'s forward runs in :func:`irkit.extract.embed_tensors` (every
    extraction, ``irkit embed``, search and serve query goes through it): "torch", "onnx" or
    "auto" (the default, also settable with $IRKIT_RUNTIME)."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    object.__setattr__(model, "_irkit_runtime", runtime)
    with _RUNNERS_LOCK:
        _RUNNERS.pop(model, None)
    return model


def requested_runtime(model: nn.Module) -> str:
    runtime = getattr(model, "_irkit_runtime", None) or os.environ.get("IRKIT_RUNTIME", "auto")
    if runtime not in RUNTIMES:
        raise ConfigError(f"$IRKIT_RUNTIME={runtime!r} is not a runtime; use one of {', '.join(RUNTIMES)}")
    return runtime


def runtime_of(model: nn.Module) -> str:
    """The runtime :func:`forward_runner` will try for ``model`` ("torch" or "onnx"), decided
    without exporting anything (a failed export or check still falls back to torch)."""
    if getattr(model, "is_onnx", False):
        return "onnx"
    runtime = requested_runtime(model)
    if runtime == "torch" or _device(model).type != "cpu":
        return "torch"
    if runtime == "onnx":
        return "onnx"
    return "onnx" if getattr(model, "preset_name", None) in ONNX_FASTER_FAMILIES and _have_onnxruntime() else "torch"


def forward_runner(model: nn.Module) -> Any:
    """The callable that computes ``model(x)`` (one scale, [B,3,H,W] -> [B,dim]) the fastest
    checked way: ``model`` itself, or an onnxruntime session of its export (cached on disk per
    preset + weights + input-size policy), whose first image is compared with torch (cosine
    >= 1 - RUNTIME_TOL; otherwise a warning and torch from then on, or ExportError when "onnx" was
    asked for explicitly)."""
    if runtime_of(model) == "torch" or getattr(model, "is_onnx", False):
        return model
    stamp = weights_stamp(model)
    with _RUNNERS_LOCK:
        entry = _RUNNERS.get(model)
        if entry is None or entry[0] != stamp:   # first use, or the weights changed since the export
            entry = (stamp, _build_runner(model))
            _RUNNERS[model] = entry
    return entry[1]


def weights_stamp(model: nn.Module) -> tuple:
    """Changes whenever ``model``'s weights do through autograd-visible ops (optimiser steps,
    ``load_state_dict``, replaced tensors): every tensor's storage and in-place version counter.
    Cheap enough to check per batch; writes through ``.data`` are invisible to it (call
    :func:`set_runtime` after those)."""
    return tuple((t.data_ptr(), t._version) for t in model.state_dict(keep_vars=True).values())


def _build_runner(model: nn.Module) -> Any:
    explicit = requested_runtime(model) == "onnx"
    try:
        path = onnx_cache_path(model)
        if not path.is_file():
            log.info("exporting %s to %s for onnxruntime (once per weights)", model.preset_name, path)
            export_onnx(model, path, tol=RUNTIME_TOL)
        return _CheckedOnnx(model, OnnxModel(path, threads=torch.get_num_threads()), explicit)
    except (ImportError, IrkitError, RuntimeError, OSError) as exc:
        if explicit:
            raise ConfigError(f"--runtime onnx: cannot run {getattr(model, 'preset_name', 'the model')} with "
                              f"onnxruntime: {exc}") from exc
        log.warning("onnxruntime unavailable for %s (%s); running torch", getattr(model, "preset_name", "model"), exc)
        return model


def onnx_cache_path(model: nn.Module, cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/onnx/<preset>-<key>.onnx``; the key hashes the model's conventions, its weights
    (every tensor, so two random initialisations never share a file), the opset and SIZE_POLICY."""
    from irkit.utils import cache_root

    h = hashlib.sha256(json.dumps([model_metadata(model), DEFAULT_OPSET, SIZE_POLICY], sort_keys=True).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return cache_root(cache_dir) / "onnx" / f"{model.preset_name}-{h.hexdigest()[:16]}.onnx"


class _CheckedOnnx:
    """Runs the onnxruntime session; the first image of the first batch also runs in torch and must
    agree (one image: the graph is the same for every row, and a whole batch twice would cost a
    short extraction a tenth of its time)."""

    def __init__(self, model: nn.Module, onnx_model: OnnxModel, explicit: bool) -> None:
        self.model, self.onnx_model, self.explicit = model, onnx_model, explicit
        self.checked = False
        self.fallback = False

    def __call__(self, x: Tensor) -> Tensor:
        if self.fallback:
            return self.model(x)
        out = self.onnx_model(x)
        if not self.checked:
            ref = self.model(x[:1]).float().cpu()
            worst = float(torch.nn.functional.cosine_similarity(ref, out[:1], dim=-1).min())
            self.checked = True
            if 1.0 - worst > RUNTIME_TOL:
                msg = (f"onnxruntime descriptors of {self.onnx_model.path} differ from torch (min cosine "
                       f"{worst:.6f} < 1 - {RUNTIME_TOL})")
                if self.explicit:
                    raise ExportError(msg)
                log.warning("%s; running torch instead", msg)
                self.fallback = True
                return self.model(x)
        return out


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _have_onnxruntime() -> bool:
    try:
        import onnx  # noqa: F401  (heavy optional dependencies: imported only when needed)
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True

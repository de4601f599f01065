"""Reading published checkpoints, strict loading with clear errors, and irkit's own format
(safetensors weights + a JSON of the config that built them; never pickled objects)."""
from __future__ import annotations

import hashlib
import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from irkit.errors import CheckpointError
from irkit.utils import atomic_path, atomic_write_json

log = logging.getLogger(__name__)
_WRAPPER_KEYS = ("model_state", "state_dict", "model")


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Load a state dict from ``.pth/.pyth/.pt`` (weights-only unpickling) or ``.safetensors``.

    Published checkpoints wrap the weights (CVNet/CFCD: ``{"model_state": ...}``); the wrapper is
    removed. A ``module.`` prefix left by DataParallel is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    if path.suffix == ".safetensors":
        try:
            state: Any = load_file(str(path))
        except Exception as exc:  # safetensors raises several types for bad files
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
            raise CheckpointError(
                f"{path}: cannot read it as a weights-only PyTorch checkpoint ({str(exc).splitlines()[0]}); "
                "it may be truncated, not a checkpoint, or contain pickled objects") from exc
    if isinstance(state, Mapping):
        for key in _WRAPPER_KEYS:
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{path}: no state dict found (expected a dict of tensors, "
                              f"optionally under one of {_WRAPPER_KEYS})")
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:5]}")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


@dataclass
class LoadReport:
    """What a (possibly partial) load did."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint (a, b) vs model (c, d)"

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 8) -> str:
        parts = []
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("mis-shaped", self.mismatched)):
            if keys:
                more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:limit])}{more}")
        return "; ".join(parts) or f"all {len(self.loaded)} tensors loaded"


def load_strict(module: nn.Module, state: Mapping[str, Tensor], allow_partial: bool = False,
                source: str = "checkpoint", display: Callable[[str], str] | None = None) -> LoadReport:
    """Load ``state`` into ``module``; refuse any missing, unexpected or mis-shaped key unless
    ``allow_partial`` (then load what fits and report the rest). ``display`` renames keys in the
    report (e.g. back to a published checkpoint's naming)."""
    name = display or (lambda k: k)
    expected = module.state_dict()
    report = LoadReport()
    usable = {}
    for key, value in state.items():
        if key not in expected:
            report.unexpected.append(name(key))
        elif tuple(value.shape) != tuple(expected[key].shape):
            report.mismatched.append(f"{name(key)}: {source} {tuple(value.shape)} vs model {tuple(expected[key].shape)}")
        else:
            usable[key] = value
    report.missing = [name(k) for k in expected if k not in state]
    if not report.complete and not allow_partial:
        raise CheckpointError(f"{source} does not match {type(module).__name__}: {report.summary()}. "
                              "Check the model preset/depth, or pass --allow-partial to load what fits.")
    module.load_state_dict(usable, strict=False)
    report.loaded = sorted(usable)
    if not report.complete:
        log.warning("partial load from %s: %s", source, report.summary())
    return report


def save_irkit_checkpoint(module: nn.Module, config: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``path`` (.safetensors) and ``path.json`` (config), atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_json(path.with_suffix(".json"), dict(config))
    return path


def load_irkit_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read an irkit checkpoint and the config that built it."""
    path = Path(path)
    state = read_checkpoint(path)
    cfg_path = path.with_suffix(".json")
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: its config {cfg_path.name} is missing; irkit checkpoints are a "
                              ".safetensors file plus a .json beside it")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({exc})") from exc
    return state, config


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file (identifies the weights a store was built with)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()

"""Named model presets: each builds its module and knows how to load its published checkpoint."""
from __future__ import annotations

import importlib
import logging
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import Tensor

from irkit.errors import ConfigError
from irkit.models.base import GlobalModel
from irkit.models.checkpoints import file_sha256, load_strict, read_checkpoint
from irkit.utils import resolve_device

log = logging.getLogger(__name__)
_NOT_PRESET_MODULES = {"base", "registry", "checkpoints"}


@dataclass(frozen=True)
class Preset:
    """``build(**options)`` makes the module with random weights; ``convert`` maps a published state
    dict onto the module's keys (identity when None) and ``unconvert`` maps back (so load errors
    name keys as the checkpoint spells them); ``default_weights`` finds weights a fresh install has
    (e.g. from a pip package) or returns None."""

    name: str
    build: Callable[..., GlobalModel]
    description: str
    convert: Callable[[Mapping[str, Tensor]], dict[str, Tensor]] | None = None
    unconvert: Callable[[Mapping[str, Tensor]], dict[str, Tensor]] | None = None
    default_weights: Callable[[], Path | None] | None = None


_PRESETS: dict[str, Preset] = {}
_loaded = False


def register_preset(preset: Preset) -> Preset:
    if preset.name in _PRESETS:
        raise ValueError(f"preset {preset.name!r} registered twice")
    _PRESETS[preset.name] = preset
    return preset


def _load_preset_modules() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import irkit.models as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name not in _NOT_PRESET_MODULES:
            importlib.import_module(f"irkit.models.{info.name}")


def list_presets() -> list[str]:
    _load_preset_modules()
    return sorted(_PRESETS)


def get_preset(name: str) -> Preset:
    _load_preset_modules()
    if name not in _PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; available: {', '.join(sorted(_PRESETS))}")
    return _PRESETS[name]


def build_model(name: str, weights: str | Path | None = None, allow_partial: bool = False,
                device: str | torch.device | None = "cpu", **options) -> GlobalModel:
    """Build preset ``name``, load ``weights`` (published layout or irkit's) or its default weights,
    and return it in eval mode on ``device``. ``model.weights_id`` records what was loaded."""
    preset = get_preset(name)
    model = preset.build(**options)
    model.preset_name = name
    path = Path(weights) if weights else (preset.default_weights() if preset.default_weights else None)
    if path is None:
        log.warning("preset %s: no weights given, using random initialisation", name)
        model.weights_id = "random"
    else:
        state = read_checkpoint(path)
        display = None
        if preset.convert is not None and not _matches_module(model, state):
            state = preset.convert(state)
            if preset.unconvert is not None:
                display = _key_display(preset.unconvert)
        model.load_report = load_strict(model, state, allow_partial=allow_partial, source=str(path),
                                        display=display)
        model.weights_id = f"{path.name}:{file_sha256(path)[:16]}"
    return model.eval().to(resolve_device(device))


def _key_display(unconvert: Callable[[Mapping[str, Tensor]], dict[str, Tensor]]) -> Callable[[str], str]:
    """A module key -> the name the published checkpoint gives it."""
    empty = torch.empty(0)
    return lambda key: next(iter(unconvert({key: empty})))


def _matches_module(model: torch.nn.Module, state: Mapping[str, Tensor]) -> bool:
    """True when ``state`` is already in the module's own key layout (an irkit checkpoint)."""
    own = model.state_dict().keys()
    return len(state) > 0 and set(state) <= set(own) and len(set(own) & set(state)) >= 0.9 * len(own)

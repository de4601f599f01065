"""R-MAC over any preset's conv map, on the Tolias grid or on learned region proposals.

``rmac-regions``: the conv trunk of a base preset (the input of its ``feature_module``, ``pool`` in
every irkit preset) followed by R-MAC, either on the fixed Tolias grid or on the boxes of a trained
region-proposal head (:class:`irkit.nn.region_proposals.ProposalRMAC`, DIR §4). It is what the
``rmac-triplet`` training recipe trains and exports; being a preset, its checkpoint loads like any
other: ``build_model("rmac-regions", weights="run/model.safetensors", **options)`` with the
``options`` that ``run/model.json`` records (base preset, regions, levels, anchors).

Options: ``base`` (preset name, default ``rmac-r101``), ``base_options`` (dict), ``regions``
("grid" | "proposals"), ``levels`` (grid levels), ``project`` (learnable per-region FC),
``top_n``, ``anchor_sizes``, ``anchor_ratios`` (proposals), ``feature_module``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from irkit.errors import ConfigError
from irkit.models.base import GlobalModel
from irkit.models.registry import Preset, get_preset, register_preset
from irkit.nn.pooling import RMAC
from irkit.nn.region_proposals import ProposalConfig, ProposalRMAC

__all__ = ["FeatureTap", "RegionModel", "build_region_model", "feature_channels"]


class FeatureTap:
    """Keeps the last *input* of ``module`` (a forward pre-hook): with the default ``pool`` that is
    the last conv map for every irkit preset (they all end in ``pool(conv map) -> ...``), whether
    the model calls its backbone directly or one of its methods."""

    def __init__(self, model: nn.Module, name: str) -> None:
        module = model
        for part in name.split("."):
            if not hasattr(module, part):
                raise ConfigError(f"model {type(model).__name__} has no submodule {name!r} to take the conv "
                                  "map from; set model.feature_module to the module that outputs it")
            module = getattr(module, part)
        self.output: Tensor | None = None
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, _module: nn.Module, inputs: Any) -> None:
        self.output = inputs[0]

    def take(self) -> Tensor:
        if self.output is None:
            raise RuntimeError("feature tap: the model has not run yet")
        out, self.output = self.output, None
        return out


def feature_channels(model: nn.Module, feature_module: str, size: int = 64) -> int:
    """Channels of the conv map entering ``feature_module`` (one dummy forward pass)."""
    tap = FeatureTap(model, feature_module)
    was = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    model.train(was)
    tap.handle.remove()
    return int(tap.take().shape[1])


class RegionModel(GlobalModel):
    """A preset's conv trunk followed by R-MAC on the Tolias grid or on learned region proposals.

    ``options`` holds what rebuilds it through the ``rmac-regions`` preset (written to the
    checkpoint JSON by the training recipe)."""

    def __init__(self, base: GlobalModel, regions: str = "grid", levels: int = 3, project: bool = True,
                 proposal_cfg: ProposalConfig | None = None, feature_module: str = "pool") -> None:
        super().__init__()
        self.base = base
        self.input_spec = base.input_spec
        self.default_scales = base.default_scales
        self.scale_reduce = "sum"
        self.feature_module = feature_module
        self.regions_kind = regions
        channels = feature_channels(base, feature_module)
        self.dim = channels
        pcfg = proposal_cfg or ProposalConfig()
        if regions == "grid":
            self.rpool: nn.Module = RMAC(L=levels, dim=channels if project else None)
            if project:
                nn.init.eye_(self.rpool.proj.fc.weight)
        elif regions == "proposals":
            self.rpool = ProposalRMAC(channels, pcfg, project=project)
        else:
            raise ConfigError(f"regions must be 'grid' or 'proposals', got {regions!r}")
        self._tap = FeatureTap(base, feature_module)
        self.options: dict[str, Any] = {
            "base": getattr(base, "preset_name", None), "regions": regions, "levels": int(levels),
            "project": bool(project), "top_n": int(pcfg.top_n), "anchor_sizes": [float(s) for s in pcfg.sizes],
            "anchor_ratios": [float(r) for r in pcfg.ratios], "feature_module": feature_module}

    def feature_map(self, x: Tensor) -> Tensor:
        """The base model's last conv map (its global head also runs; it is cheap)."""
        self.base(x)
        return self._tap.take()

    def forward(self, x: Tensor) -> Tensor:
        return self.rpool(self.feature_map(x))

    def describe(self) -> dict:
        out = super().describe()
        out.update(base=self.base.describe(), regions=self.regions_kind)
        return out


def build_region_model(base: str = "rmac-r101", base_options: dict | None = None, regions: str = "proposals",
                       levels: int = 3, project: bool = True, top_n: int = 8,
                       anchor_sizes: Sequence[float] = (2.0, 4.0, 6.0), anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0),
                       feature_module: str = "pool") -> RegionModel:
    """The ``rmac-regions`` preset's module with random weights (the base preset built unloaded)."""
    if base == "rmac-regions":
        raise ConfigError("rmac-regions cannot wrap itself; give base=<a global preset>")
    base_model = get_preset(base).build(**dict(base_options or {}))
    base_model.preset_name = base
    model = RegionModel(base_model, regions, levels, project,
                        ProposalConfig(top_n=int(top_n), sizes=tuple(anchor_sizes), ratios=tuple(anchor_ratios)),
                        feature_module)
    model.options["base_options"] = dict(base_options or {})
    return model


register_preset(Preset(
    name="rmac-regions",
    build=build_region_model,
    description=("R-MAC over a base preset's conv map on the Tolias grid or on learned region proposals "
                 "(what the rmac-triplet recipe trains; options in the run's model.json)"),
))

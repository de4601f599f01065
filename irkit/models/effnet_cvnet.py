"""EfficientNet-Lite + GeM global model with a CVNet correlation-verification re-ranker.

``effnetlite{0,1,2}-cvnet``: the ``effnetlite*-gem`` global model (same descriptors, same input
convention) plus ``reranker = CVNetReranker(in_channels=C16)`` on its stride-16 ``rerank_map``
(112/112/120 channels for lite0/1/2). Why: the only real ImageNet backbone a fresh install has is
EfficientNet-Lite, and no published CVNet re-ranker fits it, so the re-ranker is trained here
(``irkit train cvnet-rerank``, frozen backbone). One irkit checkpoint (``model.safetensors`` of that
recipe) holds backbone + re-ranker, so ``build_model("effnetlite2-cvnet", weights=...)`` and
``irkit eval ... --rerank cvnet`` need nothing else.

Without ``weights`` the preset loads the packaged ImageNet backbone and gives the re-ranker a
seeded (seed 0) random initialisation, with a warning: its scores are meaningless until trained.
"""
from __future__ import annotations

import logging
from typing import Callable, Mapping

import torch
from torch import Tensor

from irkit.models.cvnet import CVNetReranker
from irkit.models.effnet import EFFNET_MAX_SIDE, EffNetGeM
from irkit.models.effnet import convert as effnet_convert
from irkit.models.registry import Preset, register_preset
from irkit.nn.backbones.efficientnet_lite import EfficientNetLite, find_pretrained_weights

log = logging.getLogger(__name__)

__all__ = ["EffNetCVNet", "init_reranker_state"]

#: seed of the untrained re-ranker's initialisation (so a store's config is reproducible)
RERANKER_INIT_SEED = 0


class EffNetCVNet(EffNetGeM):
    """:class:`EffNetGeM` + ``reranker`` (:class:`CVNetReranker` on the stride-16 map)."""

    def __init__(self, variant: str = "lite2", proj_channels: int = 256, **options) -> None:
        super().__init__(variant, **options)
        self.reranker = CVNetReranker(in_channels=self.backbone.stride16_channels, proj_channels=proj_channels)

    def rerank_levels(self, x: Tensor) -> list[Tensor]:
        """Image batch at scale 1.0 -> prepared re-rank levels."""
        return self.reranker.prepare(self.rerank_map(x))

    def describe(self) -> dict:
        # the re-ranker does not change descriptors or maps, so stores stay comparable with -gem
        out = super().describe()
        out.update(reranker="cvnet")
        return out


def init_reranker_state(in_channels: int, proj_channels: int = 256,
                        seed: int = RERANKER_INIT_SEED) -> dict[str, Tensor]:
    """``reranker.*`` tensors of a freshly initialised re-ranker (deterministic: ``seed``), without
    touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rr = CVNetReranker(in_channels=in_channels, proj_channels=proj_channels)
    return {f"reranker.{k}": v for k, v in rr.state_dict().items()}


def _convert(variant: str) -> Callable[[Mapping[str, Tensor]], dict[str, Tensor]]:
    """Packaged ImageNet state dict -> ``backbone.*`` plus a seeded untrained ``reranker.*``."""

    def convert(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = effnet_convert(state)
        if not any(k.startswith("reranker.") for k in out):
            c16 = EfficientNetLite(variant, num_classes=None).stride16_channels
            out.update(init_reranker_state(c16))
            log.warning("effnet%s-cvnet: backbone weights only; the CVNet re-ranker is UNTRAINED (seeded init). "
                        "Train it with `irkit train cvnet-rerank` and pass --weights", variant)
        return out

    return convert


def _build(variant: str) -> Callable[..., EffNetCVNet]:
    def build(**options) -> EffNetCVNet:
        return EffNetCVNet(variant, **options)
    return build


for _v in ("lite0", "lite1", "lite2"):
    register_preset(Preset(
        name=f"effnet{_v}-cvnet",
        build=_build(_v),
        description=(f"effnet{_v}-gem (ImageNet EfficientNet-{_v.capitalize()} + GeM, 1280-D, larger side "
                     f"{EFFNET_MAX_SIDE[_v]}) + CVNet re-ranker on the stride-16 map; train the re-ranker "
                     "with `irkit train cvnet-rerank` (frozen backbone) and load that checkpoint"),
        convert=_convert(_v),
        default_weights=(lambda v=_v: find_pretrained_weights(v)),
    ))

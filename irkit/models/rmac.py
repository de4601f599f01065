"""Deep Image Retrieval (Gordo et al., ECCV 2016 / IJCV 2017): ResNet-101 + R-MAC.

``rmac-r101``: ResNet-101 stage-4 map -> R-MAC on the Tolias grid with L = 2 (overlap 0.4) ->
per region max-pool -> L2 -> shift + FC 2048->2048 (PCA-whitening initialisable) -> L2 -> sum over
regions -> L2. Larger side 800; multi-resolution {550, 800, 1050} summed, written as scales
(550/800, 1, 1050/800) relative to max_side 800 with ``scale_reduce="sum"``.

Decisions (documented because they change descriptors):

* no extra whole-image region: METHODS.md §4 describes the Tolias grid only, and DIR's released
  region generator lists level-1 squares of side min(H, W) first (for a square map that is the
  whole image); cirtorch's rmac adds the whole image, available as ``whole_image=True``;
* regions are taken on the conv map (METHODS.md §4), not ROI-pooled from image coordinates as the
  Caffe model did (unverified difference at region borders);
* pixels: the released model is a Caffe ResNet-101 (BGR, 0..255 minus the mean pixel
  103.939/116.779/123.68, no std); ``pixels="caffe"`` (default) expresses that as an InputSpec
  (mean/255, std 1/255), ``pixels="imagenet"`` uses torchvision's RGB mean/std (for fine-tuning a
  torchvision backbone). Unverified: no DIR checkpoint is available to check against.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor

from irkit.errors import ConfigError
from irkit.io.images import InputSpec
from irkit.models.base import GlobalModel
from irkit.models.registry import Preset, register_preset
from irkit.models.resnet_gem import backbone_to_irkit
from irkit.nn.backbones.resnet import ResNet
from irkit.nn.pooling import RMAC
from irkit.nn.whitening import WhiteningParams

__all__ = ["RMACNet", "RMAC_SCALES", "convert"]

RMAC_MAX_SIDE = 800
RMAC_SCALES = (550 / 800, 1.0, 1050 / 800)
_PIXELS = {
    "caffe": InputSpec("BGR", (103.939 / 255, 116.779 / 255, 123.68 / 255), (1 / 255,) * 3,
                       max_side=RMAC_MAX_SIDE),
    "imagenet": InputSpec("RGB", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), max_side=RMAC_MAX_SIDE),
}


class RMACNet(GlobalModel):
    """ResNet -> R-MAC (Tolias grid, learnable shift + FC per region) -> L2."""

    default_scales = RMAC_SCALES
    scale_reduce = "sum"

    def __init__(self, depth: int = 101, L: int = 2, overlap: float = 0.4, whole_image: bool = False,
                 pixels: str = "caffe", kind: str = "max") -> None:
        super().__init__()
        if pixels not in _PIXELS:
            raise ConfigError(f"rmac pixels must be one of {sorted(_PIXELS)}, got {pixels!r}")
        self.depth, self.pixels = depth, pixels
        self.input_spec = _PIXELS[pixels]
        self.backbone = ResNet(depth)
        self.dim = ResNet.out_channels
        self.pool = RMAC(L=L, overlap=overlap, whole_image=whole_image, kind=kind, dim=self.dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.backbone(x))

    @torch.no_grad()
    def init_region_whitening(self, images: Iterable[Tensor], shrinkage: float = 0.0) -> WhiteningParams:
        """Initialise the per-region shift + FC as Gordo et al. and Tolias et al. do: regions of the
        backbone maps of ``images`` (preprocessed batches [B, 3, H, W], as :meth:`forward` takes them;
        images of another set than the one evaluated) pooled -> L2 -> PCA-whitening, loaded as the
        shift (mean) and FC (projection). Returns the learned whitening."""
        was_training = self.training
        self.eval()
        try:
            return self.pool.init_whitening((self.backbone(x) for x in images), shrinkage=shrinkage)
        finally:
            self.train(was_training)

    def describe(self) -> dict:
        out = super().describe()
        out.update(depth=self.depth, L=self.pool.L, overlap=self.pool.overlap,
                   whole_image=self.pool.whole_image, kind=self.pool.kind)
        return out


def convert(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A ResNet backbone in torchvision/pycls naming -> ``backbone.*`` (the R-MAC projection must then
    be loaded with allow_partial or come from an irkit checkpoint)."""
    return backbone_to_irkit(state)


register_preset(Preset(
    name="rmac-r101",
    build=lambda **options: RMACNet(depth=options.pop("depth", 101), **options),
    description=("DIR (Gordo et al.): ResNet-101 + R-MAC (L=2, overlap 0.4, shift+FC 2048) + L2; larger "
                 "side 800, resolutions 550/800/1050 summed; Caffe BGR mean-pixel input"),
    convert=convert,
))

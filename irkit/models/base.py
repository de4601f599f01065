"""The interface every retrieval model (preset) implements."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from torch import Tensor, nn

from irkit.io.images import InputSpec


class GlobalModel(nn.Module):
    """A model mapping an image batch at one scale to L2-normalised global descriptors.

    Subclasses set ``input_spec`` (the pixel convention of their weights), ``default_scales``,
    ``scale_reduce`` ("mean" | "sum" | "max": how per-scale L2-normalised descriptors are combined
    before the final L2) and ``dim``. Models with a re-ranking head also implement ``rerank_map``.
    """

    input_spec: InputSpec = InputSpec()
    default_scales: tuple[float, ...] = (1.0,)
    scale_reduce: str = "mean"
    dim: int = 0
    preset_name: str = ""

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def has_rerank_map(self) -> bool:
        return type(self).rerank_map is not GlobalModel.rerank_map

    def rerank_map(self, x: Tensor) -> Tensor:
        """Dense feature map [B, C, h, w] a re-ranker consumes (not every model has one)."""
        raise NotImplementedError(f"{type(self).__name__} has no re-ranking feature map")

    def embed_and_map(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Descriptor and re-rank map of one input; models that share a trunk override it to run once."""
        return self(x), self.rerank_map(x)

    def post_scales(self, desc: Tensor) -> Tensor:
        """Applied once to the scale-combined, L2-normalised descriptor [B, dim] (``forward`` runs
        per scale): e.g. a whitening learned on multi-scale descriptors. Identity by default."""
        return desc

    def describe(self) -> dict[str, Any]:
        """What determines the descriptors, for a feature store's config hash."""
        return {"preset": self.preset_name, "class": type(self).__name__, "dim": self.dim,
                "input_spec": asdict(self.input_spec), "scale_reduce": self.scale_reduce}

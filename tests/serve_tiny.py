"""A tiny test-only model preset (with a CVNet-style re-ranker) and store builder for the serve tests.

Run as a script it registers the preset and then runs the irkit CLI, so a live ``irkit serve``
subprocess can load the tiny model: ``python tests/serve_tiny.py serve --store DIR ...``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from irkit.io.images import InputSpec
from irkit.models.base import GlobalModel

PRESET = "test-tiny-serve"


class TinyNet(GlobalModel):
    """Three strided convs -> 2x2 pooling -> 32-d; the 16-channel map feeds a small CVNet re-ranker."""

    input_spec = InputSpec(max_side=64)
    default_scales = (1.0,)
    dim = 32

    def __init__(self) -> None:
        super().__init__()
        from irkit.models.cvnet import CVNetReranker

        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, 2, 1))
        self.fc = nn.Linear(64, self.dim)
        self.reranker = CVNetReranker(in_channels=16, proj_channels=16)

    def rerank_map(self, x):
        return self.trunk(x)

    def forward(self, x):
        # signed 2x2 pooled responses, centred: random weights then still tell images apart
        f = F.adaptive_avg_pool2d(self.trunk(x), 2).flatten(1)
        f = f - f.mean(dim=1, keepdim=True)
        return F.normalize(self.fc(f), dim=-1)


PLAIN_PRESET = "test-tiny-serve-plain"


class TinyPlain(TinyNet):
    """The same network without a re-ranker (no ``rerank_map``): explanation must be refused."""

    def __init__(self) -> None:
        super().__init__()
        del self.reranker

    rerank_map = GlobalModel.rerank_map


def register() -> None:
    from irkit.models.registry import Preset, list_presets, register_preset

    if PRESET not in list_presets():
        register_preset(Preset(PRESET, TinyNet, "test-only tiny model with a re-ranker"))
    if PLAIN_PRESET not in list_presets():
        register_preset(Preset(PLAIN_PRESET, TinyPlain, "test-only tiny model without a re-ranker"))


def make_images(folder: Path, n: int, size: int = 64, seed: int = 0) -> list[Path]:
    """``n`` random-blob PNG images; image i and i+1 (i even) share most of their content."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        if i % 2 == 1:
            arr = np.clip(np.asarray(Image.open(paths[-1])).astype(int) + rng.integers(-20, 20, (size, size, 3)), 0, 255)
        else:
            arr = rng.integers(0, 256, (size // 8, size // 8, 3)).repeat(8, 0).repeat(8, 1)
        p = folder / f"img{i:03d}.png"
        Image.fromarray(arr.astype(np.uint8)).save(p)
        paths.append(p)
    return paths


def build_store(root: Path, n: int = 12, preset: str = PRESET) -> Path:
    """A feature store of ``n`` generated images under ``root`` (with re-rank maps when the preset has them)."""
    from irkit.extract import Item, extract_to_store
    from irkit.models.registry import build_model

    register()
    paths = make_images(root / "images", n)
    model = build_model(preset)
    store = extract_to_store(model, [Item(p.stem, str(p)) for p in paths], root / "store",
                             with_maps=model.has_rerank_map,
                             progress=False, workers=0)
    store.close()
    return root / "store"


if __name__ == "__main__":
    register()
    from irkit.cli import main

    if sys.argv[1:2] == ["build-store"]:
        print(build_store(Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 12))
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))

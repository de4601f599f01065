"""A tiny test-only model preset (with a CVNet-style re-ranker) and store builder for the serve tests.

Run as a script it registers the preset and then runs the irkit CLI, so a live ``irkit serve``
subprocess can load the tiny model: ``python tests/serve_tiny.py serve --store DIR ...``.
"""
from __future__ import annotations

import io
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


def png_bytes(seed: int = 1, size: int = 48) -> bytes:
    """A PNG of random 8x8-pixel blocks (``size`` square): distinct images for uploads, by seed."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size // 8, size // 8, 3)).repeat(8, 0).repeat(8, 1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


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


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``irkit serve`` of the tiny preset in a subprocess on 127.0.0.1, its output captured in ``log``.

    Why a subprocess: disconnects, slow senders and ``kill -9`` are only real against a real socket
    and a real process; the in-process TestClient cannot produce them."""

    def __init__(self, store: Path, log: Path, *extra: str, token: str | None = "live-token",
                 startup_s: float = 120.0) -> None:
        self.store, self.log, self.extra, self.token, self.startup_s = Path(store), Path(log), extra, token, startup_s
        self.port = 0
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LiveServer":
        import subprocess
        import time
        import urllib.request

        self.port = free_port()
        cmd = [sys.executable, str(Path(__file__).resolve()), "serve", "--store", str(self.store),
               "--host", "127.0.0.1", "--port", str(self.port), *self.extra]
        if self.token:
            cmd += ["--token", self.token]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"server did not answer /health within {self.startup_s:g} s:\n{self.log_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, like a power cut of the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except Exception:
                self.kill()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def __enter__(self) -> "LiveServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    register()
    from irkit.cli import main

    if sys.argv[1:2] == ["build-store"]:
        print(build_store(Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 12))
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))

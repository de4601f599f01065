"""Shared fixtures: paths to the real assets beside the project (skipped when absent)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ASSETS = SHARED / "assets"
REFERENCE = SHARED / "reference"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Dataset stores and ONNX exports go to a cache of this test session, never the user's ~/.cache."""
    import os

    before = os.environ.get("IRKIT_CACHE")
    os.environ["IRKIT_CACHE"] = str(tmp_path_factory.mktemp("irkit-cache"))
    yield
    if before is None:
        os.environ.pop("IRKIT_CACHE", None)
    else:
        os.environ["IRKIT_CACHE"] = before


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real asset {path} is absent (it lives in ../shared beside the project; CI has it)")
    return path


@pytest.fixture
def minidev_dir() -> Path:
    """Folder holding `minidev/` in revisitop layout (use as data_dir)."""
    return _need(ASSETS / "datasets" / "minidev").parent


@pytest.fixture
def revisitop_gnd_dir() -> Path:
    """Folder holding `roxford5k/gnd_roxford5k.pkl` and `rparis6k/gnd_rparis6k.pkl` (no images)."""
    return _need(ASSETS / "revisitop_gnd")


@pytest.fixture
def reference_dir() -> Path:
    """../shared/reference: official key lists and the CVNet parity fixtures."""
    return _need(REFERENCE)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for modules of small tensors: on a shared, busy machine OpenMP threads
    spin-waiting on each other made a 10 ms CVNet pair take 1.7 s. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

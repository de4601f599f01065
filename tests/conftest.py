"""Shared fixtures: paths to the real assets beside the project (skipped when absent)."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ASSETS = SHARED / "assets"
REFERENCE = SHARED / "reference"


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

"""FeatureStore.remove of many rows of one chunk: every row located before any is tombstoned."""
from __future__ import annotations

import numpy as np

from irkit.store import FeatureStore


def test_removing_many_rows_of_one_chunk(tmp_path):
    x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    s = FeatureStore.open_or_create(tmp_path / "s", model="m", config={}, dim=8, dtype="float32")
    s.add([f"a{i}" for i in range(200)], ["p"] * 200, x[:200])
    s.add([f"b{i}" for i in range(100)], ["p"] * 100, x[200:])
    gone = {f"a{i}" for i in range(0, 200, 3)} | {"b5", "b99"}
    assert s.remove(sorted(gone)) == len(gone)
    keep = [i for i in range(300) if (f"a{i}" if i < 200 else f"b{i - 200}") not in gone]
    assert s.ids == [f"a{i}" if i < 200 else f"b{i - 200}" for i in keep]
    np.testing.assert_array_equal(s.descriptors(), x[keep])
    reopened = FeatureStore.open(s.root)
    np.testing.assert_array_equal(reopened.descriptors(), x[keep])

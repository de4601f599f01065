"""Query expansion and DBA: identities, the direct formulas, torch/numpy parity, DBA properties."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from irkit.errors import ConfigError
from irkit.search.index import Index
from irkit.search.qe import alpha_qe, aqe, dba


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def xq():
    rng = np.random.default_rng(0)
    x = unit(rng.standard_normal((300, 16)))
    q = unit(x[:7] + 0.3 * rng.standard_normal((7, 16)))
    return x, q


def topk(q, x, k):
    s = q @ x.T
    r = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, r, 1), r


def test_k0_is_identity(xq):
    x, q = xq
    np.testing.assert_allclose(aqe(q, x, 0), q, atol=1e-6)
    np.testing.assert_allclose(alpha_qe(q, x, 0, 3.0), q, atol=1e-6)
    np.testing.assert_allclose(dba(x, 0), x, atol=1e-6)
    np.testing.assert_allclose(aqe(2 * q, x, 0), q, atol=1e-6)  # still normalised


def test_aqe_direct_formula(xq):
    x, q = xq
    _, r = topk(q, x, 5)
    want = unit(q + x[r].sum(axis=1))
    got = aqe(q, x, 5)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(aqe(q[0], x, 5), want[0], atol=1e-5)  # a single query vector


def test_alpha_qe_direct_formula(xq):
    x, q = xq
    s, r = topk(q, x, 4)
    want = unit(q + np.einsum("nk,nkd->nd", np.maximum(s, 0) ** 3, x[r]))
    np.testing.assert_allclose(alpha_qe(q, x, 4, alpha=3), want, atol=1e-5)
    np.testing.assert_allclose(alpha_qe(q, x, 4, alpha=0), aqe(q, x, 4), atol=1e-5)  # alpha 0 = AQE
    with pytest.raises(ConfigError):
        alpha_qe(q, x, 4, alpha=-1)
    with pytest.raises(ConfigError):
        aqe(q, x, -1)


def test_neighbours_from_an_index(xq):
    x, q = xq
    idx = Index.build(x)
    np.testing.assert_allclose(aqe(q, x, 3, neighbours=idx.search(q, 3)), aqe(q, x, 3), atol=1e-6)
    np.testing.assert_allclose(dba(x, 3, neighbours=idx.search(x, 4)), dba(x, 3), atol=1e-6)


def test_torch_in_torch_out(xq):
    x, q = xq
    got = aqe(torch.from_numpy(q).double(), torch.from_numpy(x), 3)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), aqe(q, x, 3), atol=1e-6)
    d = dba(torch.from_numpy(x), 2, 3.0)
    assert isinstance(d, torch.Tensor)
    np.testing.assert_allclose(d.numpy(), dba(x, 2, 3.0), atol=1e-6)


def test_dba_linear_weights_direct_formula(xq):
    x, _ = xq
    k = 3
    _, r = topk(x, x, k + 1)
    w = np.array([1.0, 0.75, 0.5, 0.25], np.float32)  # (k + 1 - i) / (k + 1), self first
    want = unit(np.einsum("k,nkd->nd", w, x[r]))
    np.testing.assert_allclose(dba(x, k), want, atol=1e-5)


def test_dba_alpha_and_self_handling():
    x = unit(np.random.default_rng(3).standard_normal((40, 8)))
    x = np.concatenate([x, x[:1]])  # row 40 duplicates row 0: self may not come first
    out = dba(x, 2, alpha=2.0)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    # row 0 and its duplicate have the same neighbourhood up to self: identical results
    np.testing.assert_allclose(out[0], out[40], atol=1e-5)
    s, r = topk(x[5:6], x, 3)
    assert r[0, 0] == 5
    want = unit(x[5] + (s[0, 1:, None] ** 2 * x[r[0, 1:]]).sum(0))
    np.testing.assert_allclose(out[5], want, atol=1e-5)


def test_dba_pulls_clusters_together():
    rng = np.random.default_rng(4)
    centres = unit(rng.standard_normal((10, 32)))
    x = unit(np.repeat(centres, 8, 0) + 0.6 * rng.standard_normal((80, 32)) / np.sqrt(32) * 4)
    labels = np.repeat(np.arange(10), 8)
    same = labels[:, None] == labels[None]
    gap = lambda v: (v @ v.T)[same].mean() - (v @ v.T)[~same].mean()  # noqa: E731
    assert gap(dba(x, 5)) > gap(x)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 30), k=st.integers(0, 35), alpha=st.one_of(st.none(), st.floats(0, 5)),
       seed=st.integers(0, 1000))
def test_outputs_are_unit_float32(n, k, alpha, seed):
    x = unit(np.random.default_rng(seed).standard_normal((n, 6)))
    for out in (dba(x, k, alpha), aqe(x[:2], x, k), alpha_qe(x[:2], x, k, alpha or 1.0)):
        assert out.dtype == np.float32 and np.isfinite(out).all()
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-4)

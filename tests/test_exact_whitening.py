"""learn_lw against an independent numpy implementation of Radenović et al.'s Lw (cirtorch
``whitenlearn``: query mean, inverse Cholesky factor of the pair-difference covariance, rotation
from the PCA of ALL the learning set's descriptors), on sets with rows that are not queries."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from irkit.errors import ConfigError
from irkit.nn.whitening import learn_lw


def reference_lw(X: np.ndarray, qidxs: np.ndarray, pidxs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """X is [D, N] (one column per image), as in cirtorch. Returns (m [D], P [D, D])."""
    m = X[:, qidxs].mean(axis=1, keepdims=True)
    df = X[:, qidxs] - X[:, pidxs]
    S = df @ df.T / df.shape[1]
    Pw = np.linalg.inv(np.linalg.cholesky(S))
    Xw = Pw @ (X - m)
    vals, vecs = np.linalg.eigh(Xw @ Xw.T)
    order = np.argsort(vals)[::-1]
    return m[:, 0], vecs[:, order].T @ Pw


def _learning_set(n: int, d: int, n_pairs: int, seed: int):
    """n descriptors with anisotropic spread; pairs among the first rows; the rest are in no pair
    (cirtorch's whitening set holds every image of the pool, not only the pairs' images)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) @ np.diag(np.linspace(0.5, 3.0, d)) + rng.normal(size=d)
    x[n_pairs:2 * n_pairs] = x[:n_pairs] + 0.3 * rng.normal(size=(n_pairs, d)) * np.linspace(2, 0.2, d)
    qidxs = rng.permutation(n_pairs)
    pidxs = qidxs + n_pairs
    return x, qidxs, pidxs


@pytest.mark.parametrize("d,n,n_pairs", [(8, 120, 30), (16, 300, 60), (32, 500, 120)])
def test_lw_matches_reference_at_several_dims(d, n, n_pairs):
    x, qidxs, pidxs = _learning_set(n, d, n_pairs, seed=d)
    m_ref, P_ref = reference_lw(x.T, qidxs, pidxs)
    for dims in sorted({1, 2, d // 4, d // 2, d - 1, d}):
        lw = learn_lw(torch.from_numpy(x), torch.from_numpy(qidxs), torch.from_numpy(pidxs), dims=dims)
        np.testing.assert_allclose(lw.mean.numpy(), m_ref, rtol=1e-5, atol=1e-5)
        got = lw.projection.double().numpy()
        ref = P_ref[:dims]
        ref = ref * np.sign(np.sum(got * ref, axis=1))[:, None]   # eigenvectors: defined up to sign
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        # what matters downstream: the whitened, L2-normalised descriptors are the same
        y_ref = (x - m_ref) @ ref.T
        y_ref /= np.linalg.norm(y_ref, axis=1, keepdims=True)
        y = lw.apply(torch.from_numpy(x).float()).double().numpy()
        np.testing.assert_allclose(y, y_ref, atol=1e-4)


def test_lw_rotation_uses_all_rows_not_only_queries():
    # a reduced Lw learned from the queries alone keeps another subspace on such a set
    x, qidxs, pidxs = _learning_set(300, 16, 60, seed=3)
    _, P_ref = reference_lw(x.T, qidxs, pidxs)
    lw = learn_lw(torch.from_numpy(x), torch.from_numpy(qidxs), torch.from_numpy(pidxs), dims=4)
    only_q = np.concatenate([qidxs, pidxs])
    _, P_q = reference_lw(x[np.sort(only_q)].T, np.searchsorted(np.sort(only_q), qidxs),
                          np.searchsorted(np.sort(only_q), pidxs))
    got = lw.projection.double().numpy()
    span = lambda a: a.T @ np.linalg.pinv(a.T)                 # projector on the row space  # noqa: E731
    assert np.allclose(span(got), span(P_ref[:4]), atol=1e-4)
    assert not np.allclose(span(P_ref[:4]), span(P_q[:4]), atol=1e-2)


def test_lw_refuses_bad_pairs():
    x = torch.randn(10, 4, dtype=torch.float64)
    with pytest.raises(ConfigError, match="as many"):
        learn_lw(x, [0, 1], [2])
    with pytest.raises(ConfigError, match="positive_idx must index rows of the 10"):
        learn_lw(x, [0, 1], [2, 10])
    with pytest.raises(ConfigError, match="dims"):
        learn_lw(x, [0, 1, 3, 4, 5], [2, 6, 7, 8, 9], dims=5)

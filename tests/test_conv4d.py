"""Center-pivot 4D convolution: the fast batched-conv2d form equals the plain definition."""
from __future__ import annotations

import pytest
import torch

from irkit.nn.conv4d import CenterPivotConv4d, center_pivot_conv4d, conv4d_reference


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
def test_fast_equals_reference(seed: int, kernel: int, stride: int) -> None:
    g = torch.Generator().manual_seed(seed * 10 + kernel + stride)
    dims = torch.randint(1, 8, (4,), generator=g).tolist()
    bsz, cin, cout = torch.randint(1, 3, (1,), generator=g).item(), torch.randint(1, 5, (1,), generator=g).item(), 4
    x = torch.randn(bsz, cin, *dims, generator=g, dtype=torch.float64)
    wq, wk = (torch.randn(cout, cin, kernel, kernel, generator=g, dtype=torch.float64) for _ in range(2))
    bq, bk = (torch.randn(cout, generator=g, dtype=torch.float64) for _ in range(2))
    fast = center_pivot_conv4d(x, wq, bq, wk, bk, stride)
    ref = conv4d_reference(x, wq, bq, wk, bk, stride)
    assert fast.shape == ref.shape == (bsz, cout, *[(n - 1) // stride + 1 for n in dims])
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)


def test_pivot_semantics_by_hand() -> None:
    """A single 1 at a query position reaches only outputs on the pivot cross."""
    x = torch.zeros(1, 1, 5, 5, 5, 5, dtype=torch.float64)
    x[0, 0, 2, 2, 2, 2] = 1.0
    w = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    y = center_pivot_conv4d(x, w, None, w * 10, None, stride=1)
    # query-dims conv spreads over the 3x3 query neighbourhood at key (2, 2); key-dims conv likewise
    assert y[0, 0, 1, 1, 2, 2] == 1.0 and y[0, 0, 2, 2, 1, 3] == 10.0 and y[0, 0, 2, 2, 2, 2] == 11.0
    assert y[0, 0, 1, 1, 1, 1] == 0.0 and int((y != 0).sum()) == 9 + 9 - 1


def test_module_and_strided_shape() -> None:
    torch.manual_seed(0)
    m = CenterPivotConv4d(3, 6, 5, stride=2)
    x = torch.randn(2, 3, 7, 6, 5, 9)
    y = m(x)
    assert y.shape == (2, 6, 4, 3, 3, 5) and y.is_contiguous()
    torch.testing.assert_close(y, m.forward_reference(x), rtol=1e-4, atol=1e-4)
    assert set(dict(m.named_parameters())) == {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"}


def test_rejects_bad_input() -> None:
    w = torch.zeros(1, 1, 3, 3)
    with pytest.raises(ValueError):
        center_pivot_conv4d(torch.zeros(1, 1, 3, 3), w, None, w, None)
    with pytest.raises(ValueError):
        CenterPivotConv4d(1, 1, 4)

"""Device kernels that run an op a faster way than ATen's default (rebel.device.ops.FASTER_IMPLS)
and must give ATen's results: max pooling through the channels-last kernel."""
from __future__ import annotations

import pytest
import torch

from rebel.device import ops

ATEN = torch.ops.aten.max_pool2d_with_indices.default


@pytest.mark.parametrize("shape, args", [
    ((1, 32, 17, 16), ([2, 2], [2, 2])),
    ((2, 8, 15, 15), ([3, 3], [2, 2], [1, 1], [1, 1], True)),   # padding, ceil_mode
    ((1, 16, 12, 12), ([3, 3], [1, 1], [0, 0], [2, 2])),        # dilation
    ((1, 3, 8, 8), ([2, 2],)),                                   # few channels: ATen's own layout
])
def test_max_pool_equals_atens_values_and_indices(shape, args):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).half().float()  # ties
    x.view(-1)[::37] = float("nan")
    got, want = ops.max_pool2d_with_indices(x, *args), ATEN(x, *args)
    assert got[0].is_contiguous() and got[1].is_contiguous()
    assert torch.equal(got[0].isnan(), want[0].isnan())
    assert torch.equal(got[0].nan_to_num(), want[0].nan_to_num()) and torch.equal(got[1], want[1])

"""rebel's few-row linear kernel (rebel.device.linear_rows): float32, FP16 and BF16 weights give
one result bit for bit (the same values in other storage), a row's result is the same in every
batch of one to eight rows and at every thread count, the values match a float64 reference, and
what the kernel does not take comes back as None for MKL."""
from __future__ import annotations

import pytest
import torch

from rebel.device import linear_rows, ops

pytestmark = pytest.mark.skipif(not linear_rows.available(), reason="no AVX-512 or no native library")

SHAPES = [(576, 576), (1536, 576), (101, 37), (7, 16), (9, 48), (3, 1)]


@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_every_storage_and_row_count_gives_one_result(storage, n, k):
    torch.manual_seed(n * 31 + k)
    weight = torch.randn(n, k).to(storage)
    bias = torch.randn(n)
    x = torch.randn(linear_rows.max_rows(), k)
    full = linear_rows.linear(x, weight, bias)
    assert full is not None and full.shape == (len(x), n)
    ref = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    assert (full - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-6
    assert torch.equal(linear_rows.linear(x, weight.float(), bias), full)  # float32 storage
    for rows in range(1, len(x) + 1):  # each row alone, and every prefix batch
        assert torch.equal(linear_rows.linear(x[:rows], weight, bias), full[:rows])
        assert torch.equal(linear_rows.linear(x[rows - 1:rows], weight, bias)[0], full[rows - 1])
    assert torch.equal(linear_rows.linear(x, weight) + bias, full) or \
        (linear_rows.linear(x, weight) + bias - full).abs().max() <= 1e-5 * full.abs().max()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_count_does_not_change_results(threads):
    torch.manual_seed(0)
    weight, x = torch.randn(1536, 576).half(), torch.randn(4, 576)
    expected = linear_rows.linear(x, weight)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.equal(linear_rows.linear(x, weight), expected)
    finally:
        torch.set_num_threads(saved)


def test_batched_and_transposed_inputs():
    """x of any rank (rows are all but its last dim), contiguous or not."""
    torch.manual_seed(1)
    weight, bias = torch.randn(64, 32).half(), torch.randn(64)
    x = torch.randn(2, 3, 32)
    out = linear_rows.linear(x, weight, bias)
    assert out.shape == (2, 3, 64)
    assert torch.equal(out.reshape(6, 64), linear_rows.linear(x.reshape(6, 32), weight, bias))
    xt = torch.randn(32, 4).t()  # rows of a transposed view
    assert torch.equal(linear_rows.linear(xt, weight, bias), linear_rows.linear(xt.contiguous(), weight, bias))


def test_what_the_kernel_does_not_take_is_left_to_mkl():
    w = torch.randn(16, 8)
    too_many = torch.randn(linear_rows.max_rows() + 1, 8)
    assert linear_rows.linear(too_many, w) is None
    assert linear_rows.linear(torch.randn(0, 8), w) is None
    assert linear_rows.linear(torch.randn(2, 8), w.t().contiguous().t()) is None  # strided weight
    assert linear_rows.linear(torch.randn(2, 8).double(), w.double()) is None
    assert linear_rows.linear(torch.randn(2, 8), w, torch.randn(15)) is None  # bias of another width
    assert linear_rows.linear(torch.randn(2, 8, requires_grad=True), w) is None
    # ops.linear_on_rows (the device's linear) falls back to aten for those, with the same values
    x = torch.randn(linear_rows.max_rows() + 1, 8)
    assert torch.equal(ops.linear_on_rows(x, w), torch.nn.functional.linear(x, w))
    y = ops.linear_on_rows(x[:3], w)
    assert torch.equal(y, linear_rows.linear(x[:3], w))
    assert (y - torch.nn.functional.linear(x[:3], w)).abs().max() < 1e-5

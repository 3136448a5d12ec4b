"""The native kernel tails (rebel.device.epilogues, csrc/epilogues.c) and their fusion into a
kernel's rounding (rebel.device.tail_fusion): GELU and layer norm against float64 references,
fused results equal to the op-by-op ones bit for bit (the interpreter's), and the rewrite that
fuses only chains nothing else reads."""
from __future__ import annotations

import pytest
import torch

from rebel.device import epilogues, ops, rounding, tail_fusion
from rebel.device.codegen import VIEW_OPS
from rebel.ir import GETITEM, Op, Ref, TensorSpec

native = pytest.mark.skipif(not epilogues.available(), reason="no AVX-512 here: ATen runs these")


def _gelu64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x * 0.5 * torch.special.erfc(-x / 2 ** 0.5)


@native
def test_gelu_is_accurate_across_the_line_and_in_the_negative_tail():
    x = torch.linspace(-12.5, 12.5, 400_001)
    got, ref = epilogues.gelu(x).double(), _gelu64(x)
    rel = (got - ref).abs() / ref.abs().clamp_min(1e-38)
    # far out, x's own rounding moves exp(-x^2 / 2) by x^2 ulps: still 5e-5 at x = -12.5
    assert rel[x >= -4].max() < 2e-6 and rel[ref.abs() > 1e-30].max() < 5e-5
    # ATen's 1 + erf(x) loses the tail: at x = -6 its relative error is far above ours
    at = (x + 6).abs().argmin()
    assert rel[at] < 5e-6
    aten = torch.nn.functional.gelu(x[at]).double()
    assert (aten - ref[at]).abs() / ref[at].abs() > 1e-3
    # rounded to FP16, almost every value is the exact value's rounding
    wide = torch.randn(1 << 18, generator=torch.Generator().manual_seed(0)) * 3
    exact = _gelu64(wide).to(torch.float16).float()
    assert (epilogues.gelu(wide).half().float() != exact).sum() < 100


@native
def test_gelu_special_values_and_far_tail():
    x = torch.tensor([0.0, -0.0, float("inf"), float("nan"), -13.0, -1e30, 1e30, 1e-40])
    y = epilogues.gelu(x)
    assert y[0] == 0 and y[1] == 0 and y[2] == float("inf") and y[3].isnan()
    assert y[4] == 0 and y[5] == 0 and y[6] == 1e30  # Phi below 2e-37 is taken as 0
    assert abs(y[7].item() - 5e-41) < 1e-44


@native
def test_gelu_in_place_equals_gelu_and_tanh_form_is_atens():
    x = torch.randn(3, 1000)
    assert torch.equal(epilogues.gelu_(x.clone()), epilogues.gelu(x))
    assert torch.equal(epilogues.gelu(x, "tanh"), torch.nn.functional.gelu(x, approximate="tanh"))
    strided = x.t()  # not contiguous: ATen's
    assert torch.equal(epilogues.gelu(strided), torch.nn.functional.gelu(strided))


@native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [17, 256, 1000])
def test_bias_gelu_round_in_one_pass_equals_op_by_op(dtype, n):
    g = torch.Generator().manual_seed(n)
    y = torch.randn(37, n, generator=g) * 8
    bias = torch.randn(n, generator=g)
    step = rounding.rounded(epilogues.gelu(y + bias), dtype)
    assert torch.equal(epilogues.tail(y.clone(), bias, True, dtype), step)
    assert torch.equal(epilogues.tail(y.clone(), bias, False, dtype), rounding.rounded(y + bias, dtype))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(epilogues.tail(y.clone(), bias, True, dtype), step)
    finally:
        torch.set_num_threads(threads)


@native
@pytest.mark.parametrize("n", [17, 256, 4096])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_against_float64_and_atens_moments(n, affine):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, 33, n, generator=g) * 2 + 0.5
    w, b = (torch.randn(n, generator=g), torch.randn(n, generator=g)) if affine else (None, None)
    y, mean, rstd = epilogues.native_layer_norm(x, [n], w, b, 1e-5)
    ref = torch.nn.functional.layer_norm(x.double(), (n,), None if w is None else w.double(),
                                         None if b is None else b.double(), 1e-5)
    assert (y - ref).abs().max() < 1e-5
    _, at_mean, at_rstd = torch.ops.aten.native_layer_norm(x, [n], w, b, 1e-5)
    assert mean.shape == at_mean.shape == (2, 33, 1) and rstd.shape == at_rstd.shape
    torch.testing.assert_close(mean, at_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd, at_rstd, rtol=1e-5, atol=1e-6)


def test_layer_norm_over_two_dims_is_atens():
    x = torch.randn(4, 6, 8)
    got = epilogues.native_layer_norm(x, [6, 8], None, None, 1e-5)
    want = torch.ops.aten.native_layer_norm(x, [6, 8], None, None, 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_residual_norm_rounded_equals_add_then_norm_then_round(dtype):
    g = torch.Generator().manual_seed(1)
    x, r = torch.randn(5, 64, 256, generator=g), torch.randn(5, 64, 256, generator=g)
    w, b = torch.randn(256, generator=g), torch.randn(256, generator=g)
    step = rounding.rounded(epilogues.native_layer_norm(x + r, [256], w, b, 1e-5)[0], dtype)
    assert torch.equal(epilogues.layer_norm_rounded(x, r, [256], w, b, 1e-5, dtype), step)
    # a residual that broadcasts takes the op-by-op path: the same values
    row = r[:1]
    step = rounding.rounded(epilogues.native_layer_norm(x + row, [256], w, b, 1e-5)[0], dtype)
    assert torch.equal(epilogues.layer_norm_rounded(x, row, [256], w, b, 1e-5, dtype), step)


@pytest.mark.parametrize("rows", [3, 64])
def test_linear_adds_the_bias_to_the_finished_product(rows):
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 300, generator=g), torch.randn(70, 300, generator=g), torch.randn(70, generator=g)
    y = ops.linear_on_rows(x, w, b)
    assert torch.equal(y, ops.linear_on_rows(x, w) + b)  # addmm would start the sum from the bias
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    fused = ops.linear_tail(x, w, b, gelu=True, dtype=torch.float16)
    assert torch.equal(fused, rounding.rounded(epilogues.gelu(y), torch.float16))


def _op(name, target, args, shape=(4, 8)):
    return Op(name, target, tuple(args), {}, TensorSpec(shape, "float32"))


def _chain():
    lin = _op("lin", tail_fusion.LINEAR, [Ref("x"), Ref("w"), Ref("b")])
    gelu = _op("g", tail_fusion.GELU, [Ref("lin")])
    add = _op("s", tail_fusion.ADD, [Ref("g"), Ref("x")])
    norm = Op("n", tail_fusion.NORM, (Ref("s"), [8], Ref("nw"), Ref("nb"), 1e-5), {},
              (TensorSpec((4, 8), "float32"), TensorSpec((4, 1), "float32"), TensorSpec((4, 1), "float32")))
    out = _op("o", GETITEM, [Ref("n"), 0])
    return [([lin, gelu], ["g"]), ([add, norm, out], ["o"])]


def test_rewrite_fuses_each_tail_into_one_op():
    kernels = tail_fusion.rewrite(_chain(), set(), torch.float16, {}, VIEW_OPS)
    (first, _), (second, _) = kernels
    assert [(op.name, op.target) for op in first] == [("g", "rbln_tail.linear_gelu")]
    assert first[0].args == (Ref("x"), Ref("w"), Ref("b"), torch.float16)
    assert [(op.name, op.target) for op in second] == [("o", "rbln_tail.layer_norm")]
    assert second[0].args[:2] == (Ref("g"), Ref("x"))


def test_rewrite_leaves_chains_others_read():
    # the linear's result is also read outside the block: GELU stays apart
    kernels = tail_fusion.rewrite(_chain(), {"lin"}, torch.float16, {}, VIEW_OPS)
    assert [op.target for op in kernels[0][0]] == [tail_fusion.LINEAR, tail_fusion.GELU]
    # the norm's statistics are read: no fusion; the residual sum kept: the norm fuses alone
    chain = _chain()
    chain[1][0].append(_op("m", GETITEM, [Ref("n"), 1], (4, 1)))
    assert [op.target for op in tail_fusion.rewrite(chain, set(), torch.float16)[1][0]][-2:] == \
        [GETITEM, GETITEM]
    kernels = tail_fusion.rewrite(_chain(), {"s"}, torch.float16)
    assert [op.target for op in kernels[1][0]] == [tail_fusion.ADD, "rbln_tail.layer_norm"]
    # an output an op of the same kernel reads is rounded after that op reads it
    lin = _op("lin", tail_fusion.LINEAR, [Ref("x"), Ref("w"), Ref("b")])
    use = _op("u", "aten.mul.Tensor", [Ref("lin"), Ref("lin")])
    kernels = tail_fusion.rewrite([([lin, use], ["lin", "u"])], set(), torch.float16)
    assert [op.target for op in kernels[0][0]] == [tail_fusion.LINEAR, "aten.mul.Tensor"]
    # a float32 device (no rounding) is left alone
    assert tail_fusion.rewrite(_chain(), set(), torch.float32) == _chain()


def _bn_params(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(c, generator=g), torch.randn(c, generator=g), torch.randn(c, generator=g),
            torch.rand(c, generator=g) + 0.5)


@native
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (3, 6, 40), (8, 4)])
def test_batch_norm_against_float64_and_atens(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3)) * 3
    w, b, mean, var = _bn_params(shape[1])
    y, s1, s2 = epilogues.batch_norm(x, w, b, mean, var, 0.1, 1e-5)
    view = (1, -1) + (1,) * (x.dim() - 2)
    ref = (x.double() - mean.double().view(view)) / (var.double().view(view) + 1e-5).sqrt() * \
        w.double().view(view) + b.double().view(view)
    assert (y - ref).abs().max() < 1e-5
    at = torch.ops.aten._native_batch_norm_legit_no_training.default(x, w, b, mean, var, 0.1, 1e-5)
    torch.testing.assert_close(y, at[0], rtol=1e-6, atol=1e-6)
    assert s1.shape == at[1].shape and s2.shape == at[2].shape
    y0 = epilogues.batch_norm(x, None, None, mean, var, 0.1, 1e-5)[0]
    assert (y0 - (x.double() - mean.double().view(view)) / (var.double().view(view) + 1e-5).sqrt()).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("relu", [True, False])
def test_batch_norm_rounded_equals_op_by_op(dtype, relu):
    x = torch.randn(2, 6, 11, 13, generator=torch.Generator().manual_seed(4)) * 4
    x[0, 0, 0, :3] = torch.tensor([-1e-30, float("nan"), -0.0])
    w, b, mean, var = _bn_params(6, seed=1)
    w[0], b[0], mean[0] = 1.0, 0.0, 0.0  # channel 0 passes its values through
    for round_input in (True, False):
        src = rounding.rounded(x, dtype) if round_input else x
        y = epilogues.batch_norm(src, w, b, mean, var, 0.1, 1e-5)[0]
        step = rounding.rounded(torch.relu(y) if relu else y, dtype)
        got = epilogues.batch_norm_rounded(x, w, b, mean, var, 1e-5, relu, round_input, dtype)
        assert torch.equal(got.isnan(), step.isnan())
        keep = ~step.isnan()
        assert torch.equal(got[keep], step[keep]) and torch.equal(got.signbit()[keep], step.signbit()[keep])


def test_rewrite_moves_a_convolutions_rounding_into_the_batch_norm_reading_it():
    conv = _op("c", tail_fusion.CONV, [Ref("x"), Ref("w"), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1])
    bn = Op("bn", tail_fusion.BATCH_NORM, (Ref("c"), Ref("g"), Ref("b"), Ref("m"), Ref("v"), 0.1, 1e-5), {},
            (TensorSpec((4, 8), "float32"), TensorSpec((0,), "float32"), TensorSpec((0,), "float32")))
    item = _op("y", GETITEM, [Ref("bn"), 0])
    relu = _op("r", tail_fusion.RELU, [Ref("y")])
    (first, first_out), (second, _) = tail_fusion.rewrite([([conv], ["c"]), ([bn, item, relu], ["r"])],
                                                          set(), torch.float16)
    assert first == [conv] and first_out == []  # the convolution's output is rounded as it is read
    assert [op.target for op in second] == ["rbln_tail.batch_norm"]
    assert second[0].args[6:] == (True, True, torch.float16)
    # read by another op too: the convolution rounds its own output, the norm reads it rounded
    other = _op("o", "aten.mul.Tensor", [Ref("c"), Ref("c")])
    kernels = tail_fusion.rewrite([([conv], ["c"]), ([bn, item, relu], ["r"]), ([other], ["o"])],
                                  set(), torch.float16)
    assert kernels[0][1] == ["c"] and kernels[1][0][0].args[7] is False

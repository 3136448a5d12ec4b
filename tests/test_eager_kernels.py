"""The kernels eager PyTorch launches on the H100 spec for ops the graph holds as one
(compiler/eager_attention.py, compiler/eager_kernels.py): SDPA with a mask broadcast along the
keys runs the FP32 math composite, NCHW convolutions transpose input, filter and output, eval
batch norms on half weights run three native kernels, permutes and eval dropout are views, and
the L2 is a cache whose held tensors still cost their bytes. NPU specs keep one kernel per op."""
from __future__ import annotations

import json
import pytest
import torch
import torch.nn.functional as F

from rebel.compiler.compile import compile_module
from rebel.device.engine import EventEngine
from rebel.device.events import HDMA
from rebel.device.timing import GemmTiling, KernelPlan, matrix_seconds
from rebel.npu import load_spec
from rebel.runtime.timeline import build_steps

H100 = "NVIDIA-H100-SXM"
ATOM = "RBLN-CA12"
B, H, S, D = 2, 4, 128, 64


def meta(*shape, dtype=torch.float16):
    return torch.empty(*shape, dtype=dtype, device="meta")


class BroadcastMask(torch.nn.Module):
    """transformers 5's traced validity mask: [1, 1, S, 1] expanded to [B, 1, S, S]."""

    def forward(self, q, k, v, valid):
        mask = valid.expand(q.shape[0], 1, q.shape[2], k.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D ** -0.5)


class DenseMask(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D ** -0.5)


def qkv():
    return [meta(B, H, S, D), meta(B, H, S, D), meta(B, H, S, D)]


def compiled(module, inputs, npu=H100, fusion=False):
    return compile_module(module, inputs, npu=npu, device_dtype="float16", progress=False,
                          fusion=fusion)


def span_s(program, npu=H100) -> float:
    spec = load_spec(npu)
    events = [e for e in EventEngine(spec, device=0, resident_inputs=True).run(
        build_steps(program, spec)).events if e.device is not None and e.track != HDMA]
    return max(e.end_s for e in events) - min(e.start_s for e in events)


def attention_kernel(program):
    return next(k for k in program.kernels if k.kind == "attention")


def test_broadcast_mask_runs_the_fp32_math_composite_on_the_h100():
    c = compiled(BroadcastMask(), [*qkv(), meta(1, 1, S, 1, dtype=torch.bool)])
    parts = attention_kernel(c.program).plan.parts
    labels = [p.label for p in parts]
    # casts up, the two FP32 batched GEMMs, the softmax row kernel and _safe_softmax's fix-up
    assert labels[:3] == ["q_to_f32", "k_to_f32", "v_to_f32"]
    assert [p.label for p in parts if p.kind == "gemm"] == ["bmm_qk", "bmm_pv"]
    assert all(p.dtype == "float32" for p in parts if p.kind in ("gemm", "softmax"))
    assert {"mask_masked_fill", "add_mask", "softmax", "eq_neg_inf", "all", "where",
            "out_to_half"} <= set(labels)
    # B > 1: the transposed q, k, v are copied before the batched GEMMs (reshape of a view
    # that cannot merge batch and heads) -- here the inputs are plain, so no copies
    assert not any(label.endswith("_contiguous") for label in labels)
    # every part is one kernel launch in the timeline
    steps = build_steps(c.program, load_spec(H100))
    names = [k.name for s in steps for k in getattr(s, "kernels", ())]
    assert sum(n.startswith(attention_kernel(c.program).name + ".") for n in names) == len(parts)


def test_broadcast_mask_is_slower_than_a_unit_stride_one():
    broadcast = compiled(BroadcastMask(), [*qkv(), meta(1, 1, S, 1, dtype=torch.bool)])
    dense = compiled(DenseMask(), [*qkv(), meta(B, 1, S, S, dtype=torch.bool)])
    assert not attention_kernel(dense.program).plan.parts  # fused: one kernel
    assert span_s(broadcast.program) > 2 * span_s(dense.program)


def test_npu_specs_keep_one_attention_kernel():
    c = compiled(BroadcastMask(), [*qkv(), meta(1, 1, S, 1, dtype=torch.bool)], npu=ATOM)
    assert not attention_kernel(c.program).plan.parts
    spec = load_spec(ATOM).die.compute
    assert not (spec.attention_mask_unit_stride or spec.math_attention_fp32 or spec.eager_views
                or spec.batch_norm_native_eval or spec.conv_filter_transposes
                or spec.tile_operands_from_shared_sram)
    assert not load_spec(ATOM).die.memory.shared_sram_is_cache


def test_transposed_inputs_are_copied_before_the_batched_gemms():
    class Heads(torch.nn.Module):
        def forward(self, x, valid):
            q = x.view(B, S, H, D).transpose(1, 2)
            mask = valid.expand(B, 1, S, S)
            return F.scaled_dot_product_attention(q, q, q, attn_mask=mask, scale=D ** -0.5)

    c = compiled(Heads(), [meta(B, S, H * D), meta(1, 1, S, 1, dtype=torch.bool)])
    labels = [p.label for p in attention_kernel(c.program).plan.parts]
    assert {"q_contiguous", "k_contiguous", "v_contiguous"} <= set(labels)


def test_plan_parts_survive_the_artifact_json():
    c = compiled(BroadcastMask(), [*qkv(), meta(1, 1, S, 1, dtype=torch.bool)])
    plan = attention_kernel(c.program).plan
    again = KernelPlan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again == plan


class ConvBn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(64)

    def forward(self, x):
        return self.bn(self.conv(x))


def conv_bn(weights=torch.float16):
    m = ConvBn().to("meta").to(torch.float16).eval()
    m.bn.to(weights)
    return m


def test_nchw_conv_transposes_input_filter_and_output(tmp_path):
    c = compiled(conv_bn(), [meta(8, 64, 56, 56)])
    conv = next(k for k in c.program.kernels if k.kind == "conv")
    assert [p.label for p in conv.plan.parts] == ["nchw_to_nhwc", "filter_to_krsc", "conv",
                                                  "nhwc_to_nchw"]
    spec = load_spec(H100)
    plain = tmp_path / "h100-nhwc.toml"  # the same GPU, convolutions without transposes
    plain.write_text(f'base = "{H100}"\nname = "H100-no-transposes"\n'
                     '[die.compute]\nconv_layout_transposes = false\n')
    without = compile_module(conv_bn(), [meta(8, 64, 56, 56)], npu=str(plain),
                             device_dtype="float16", progress=False, fusion=False)
    assert not next(k for k in without.program.kernels if k.kind == "conv").plan.parts
    # each transpose is a launch and a pass over its tensor
    assert span_s(c.program) > span_s(without.program, str(plain)) + \
        3 * spec.die.compute.kernel_launch_s


def test_eval_batch_norm_on_half_weights_runs_three_native_kernels():
    c = compiled(conv_bn(), [meta(8, 64, 56, 56)])
    bn = next(k for k in c.program.kernels if k.kind == "norm")
    assert [p.label for p in bn.plan.parts] == ["copy_running_mean", "calc_invstd", "elementwise"]
    # FP32 weights with half input: cuDNN's one kernel
    c32 = compiled(conv_bn(torch.float32), [meta(8, 64, 56, 56)])
    bn32 = next(k for k in c32.program.kernels if k.kind == "norm")
    assert not bn32.plan.parts


def test_permutes_and_eval_dropout_launch_no_kernel_in_eager():
    class Views(torch.nn.Module):
        def forward(self, x):
            y = F.dropout(x.permute(0, 2, 1), 0.1, training=False)
            return y.contiguous() * 2

    x = meta(4, 256, 512)
    h100 = compiled(Views(), [x])
    silent = [k for k in h100.program.kernels if not k.plan.launches]
    assert silent and all(k.kind == "data" for k in silent)
    steps = [k.name for s in build_steps(h100.program, load_spec(H100))
             for k in getattr(s, "kernels", ())]
    assert not any(k.name in steps for k in silent)
    atom = compiled(Views(), [x], npu=ATOM)
    assert all(k.plan.launches for k in atom.program.kernels)


def test_tensors_held_in_the_l2_still_cost_their_bytes():
    class Chain(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x + 1) * 3

    c = compiled(Chain(), [meta(1 << 20)])
    middle = [k for k in c.program.kernels if k.kind == "elementwise"][1]
    assert not middle.plan.dma_in  # held in the L2 by the schedule
    assert middle.plan.sram_bytes >= 2 * (1 << 21)  # but read and written there
    atom = compiled(Chain(), [meta(1 << 20)], npu=ATOM)
    assert [k for k in atom.program.kernels if k.kind == "elementwise"][1].plan.sram_bytes == 0


def test_fusion_off_is_never_faster_for_the_eager_mechanisms():
    on = compiled(conv_bn(), [meta(8, 64, 56, 56)], fusion=True)
    off = compiled(conv_bn(), [meta(8, 64, 56, 56)], fusion=False)
    assert span_s(off.program) >= span_s(on.program) * (1 - 1e-9)


def test_small_gemm_tiles_are_capped_by_their_operand_traffic_through_the_l2():
    spec = load_spec(H100)
    c = spec.die.compute
    per_engine = c.peak_flops("float16") * c.matmul_efficiency / c.neural_engines
    share = spec.die.memory.shared_sram_bandwidth / c.neural_engines
    big = GemmTiling(256, 256, 1024, c.neural_engines, 1)
    small = GemmTiling(64, 64, 1024, c.neural_engines, 1)
    # a 256x256 tile does 128 FLOPs per staged byte: the tensor cores bound it
    assert matrix_seconds(big, spec, "float16") == pytest.approx(2 * 256 * 256 * 1024 / per_engine)
    # a 64x64 tile does 32: staging its (64 + 64) x 1024 half operands bounds it
    assert matrix_seconds(small, spec, "float16") == pytest.approx((64 + 64) * 1024 * 2 / share)
    assert matrix_seconds(small, spec, "float16") > 2 * 64 * 64 * 1024 / per_engine
    # the ATOM's tiles are fed by its DMA, not staged through a cache: no such cap
    atom = load_spec(ATOM)
    a = atom.die.compute
    assert matrix_seconds(small, atom, "float16") == pytest.approx(
        2 * 64 * 64 * 1024 / (a.peak_flops("float16") * a.matmul_efficiency / a.neural_engines)
        * (-(-c.neural_engines // a.neural_engines)))

"""Weight-only quantized linear layers: int8 or int4 weights, FP16 activations.

A decode step of an LLM is bound by the bytes of weights it streams from DRAM, so storing
weights in 8 or 4 bits (plus a scale per group of input features) makes it faster and lets
larger models fit, while activations and arithmetic stay 16-bit. `rbln::linear_weight_only`
is registered with torch.library so torch.export keeps it as one node: the compiler turns it
into one GEMM kernel whose weight operand is the packed bytes plus the scales.

Storage (what sits in device DRAM, and what Task DMA moves):
  int8: qweight int8 [out, in];
  int4: qweight uint8 [out, in / 2], two signed 4-bit values per byte, low nibble first
        (column 2i in the low nibble, 2i + 1 in the high one);
  scales float16 [out, in / group_size] (group_size = in: one scale per output channel).
Semantics: w = q * scale in FP32 (each scale covering group_size consecutive input features),
then x @ w.T + bias in FP32; the result has x's dtype (on the device a kernel's output is
rounded to the device dtype, as every kernel's is).

`WeightOnlyLinear` holds such weights (quantized symmetrically per group: scale = max|w| /
(2^(bits-1) - 1)) and `quantize_linears` swaps a model's nn.Linear layers for it. Both work
on meta tensors (shapes only), which is what capacity planning compiles.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

BITS = (4, 8)
TARGET = "rbln.linear_weight_only.default"


def _check(x_features: int | None, qweight: torch.Tensor, scales: torch.Tensor, bits: int,
           group_size: int, bias: Optional[torch.Tensor]) -> int:
    """Validate the operands' layout; returns in_features. Errors say what was wrong."""
    if bits not in BITS:
        raise ValueError(f"linear_weight_only: bits must be 4 or 8, got {bits}")
    want = torch.int8 if bits == 8 else torch.uint8
    if qweight.dtype != want or qweight.dim() != 2:
        raise ValueError(f"linear_weight_only: {bits}-bit weights are stored as a 2-d {want} tensor, "
                         f"got {qweight.dtype} of shape {tuple(qweight.shape)}")
    out_features = qweight.shape[0]
    in_features = qweight.shape[1] * (2 if bits == 4 else 1)
    if x_features is not None and x_features != in_features:
        raise ValueError(f"linear_weight_only: input has {x_features} features, the weight "
                         f"takes {in_features}")
    _check_group(in_features, group_size, bits)
    groups = in_features // group_size
    if tuple(scales.shape) != (out_features, groups) or not scales.is_floating_point():
        raise ValueError(f"linear_weight_only: scales must be a float tensor of shape "
                         f"({out_features}, {groups}), got {scales.dtype} {tuple(scales.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"linear_weight_only: bias must have shape ({out_features},), "
                         f"got {tuple(bias.shape)}")
    return in_features


def _check_group(in_features: int, group_size: int, bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"weight-only quantization: bits must be 4 or 8, got {bits}")
    if bits == 4 and in_features % 2:
        raise ValueError(f"weight-only quantization: int4 packs two weights per byte, so "
                         f"in_features must be even, got {in_features}")
    if not isinstance(group_size, int) or group_size < 1 or in_features % group_size:
        raise ValueError(f"weight-only quantization: group_size {group_size} must divide "
                         f"in_features {in_features}")


def qmax(bits: int) -> int:
    """Largest quantized magnitude: symmetric, so int8 uses [-127, 127] and int4 [-7, 7]."""
    return 2 ** (bits - 1) - 1


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit values (an integer tensor [out, in], in in [-8, 7]) as uint8 [out, in / 2],
    column 2i in the low nibble and 2i + 1 in the high one."""
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: int8 [out, in] with values in [-8, 7]."""
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    both = torch.stack([low, high], dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)
    return torch.where(both >= 8, both - 16, both)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """The FP32 weight [out, in] the stored bytes stand for. The group size follows from the
    shapes (in / scales.shape[1]), so a die holding a slice of the weight (tensor
    parallelism) dequantizes its slice with the same rule."""
    q = unpack_int4(qweight) if bits == 4 else qweight
    out_features, in_features = q.shape
    groups = scales.shape[1]
    if groups < 1 or in_features % groups:
        raise ValueError(f"linear_weight_only: {groups} scale groups do not divide "
                         f"{in_features} input features")
    w = q.float().view(out_features, groups, in_features // groups) * scales.float().unsqueeze(-1)
    return w.view(out_features, in_features)


def linear_weight_only_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                                 bits: int, group_size: int,
                                 bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FP32 reference: dequantize, then x @ w.T + bias, in FP32; the result in x's dtype."""
    _check(x.shape[-1], qweight, scales, bits, group_size, bias)
    return _apply(x, dequantize(qweight, scales, bits), bias)


def _apply(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    out = torch.matmul(x.float(), w.t())
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


@torch.library.custom_op("rbln::linear_weight_only", mutates_args=())
def linear_weight_only(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int,
                       group_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return linear_weight_only_reference(x, qweight, scales, bits, group_size, bias)


@linear_weight_only.register_fake
def _(x, qweight, scales, bits, group_size, bias=None):
    _check(x.shape[-1], qweight, scales, bits, group_size, bias)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def linear_weight_only_device(x, qweight, scales, bits: int, group_size: int, bias=None):
    """The device kernel: the reference arithmetic on the operands one die holds. Under tensor
    parallelism a die's slice of the weight covers only part of the input features, so the
    group size is taken from the shapes (`dequantize`), not from the compile-time argument."""
    return _apply(x, dequantize(qweight, scales, bits), bias)


def quantize_weight(weight: torch.Tensor, bits: int,
                    group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-group quantization of a [out, in] weight: (qweight, scales) as stored.
    scale = max|w| / qmax over each group, kept in FP16; q = round(w / scale) with the FP16
    scale (the one dequantization uses), clamped to [-qmax, qmax]; an all-zero group gets
    scale 0 and q 0. Meta weights give meta results of the right shapes and dtypes."""
    if weight.dim() != 2:
        raise ValueError(f"weight-only quantization takes a 2-d weight, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    group_size = in_features if group_size is None else group_size
    _check_group(in_features, group_size, bits)
    limit = qmax(bits)
    w = weight.detach().float().view(out_features, in_features // group_size, group_size)
    scales = (w.abs().amax(-1) / limit).to(torch.float16)
    safe = torch.where(scales == 0, torch.ones_like(scales), scales).float().unsqueeze(-1)
    q = torch.round(w / safe).clamp(-limit, limit).view(out_features, in_features)
    q = q.to(torch.int8)
    return (pack_int4(q) if bits == 4 else q), scales


class WeightOnlyLinear(nn.Module):
    """nn.Linear with int8 or int4 weights (and FP16 scales per group), computing
    `rbln::linear_weight_only`. Weights are buffers, so they travel with state_dict and
    become the compiled program's weights as stored."""

    def __init__(self, in_features: int, out_features: int, bits: int = 8,
                 group_size: int | None = None, bias: bool = True, device=None,
                 dtype: torch.dtype = torch.float16):
        super().__init__()
        group_size = in_features if group_size is None else group_size
        _check_group(in_features, group_size, bits)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        stored = (out_features, in_features // 2) if bits == 4 else (out_features, in_features)
        self.register_buffer("qweight", torch.zeros(
            stored, dtype=torch.uint8 if bits == 4 else torch.int8, device=device))
        self.register_buffer("scales", torch.zeros(
            (out_features, in_features // group_size), dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device)
                             if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8,
                    group_size: int | None = None) -> WeightOnlyLinear:
        """A quantized copy of `linear` (group_size None: one scale per output channel)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"WeightOnlyLinear.from_linear takes an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, bits, group_size,
                    bias=linear.bias is not None, device=weight.device,
                    dtype=weight.dtype if weight.is_floating_point() else torch.float16)
        qweight, scales = quantize_weight(weight, bits, layer.group_size)
        layer.qweight, layer.scales = qweight, scales
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        """The FP32 weight the layer computes with."""
        return dequantize(self.qweight, self.scales, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.rbln.linear_weight_only(x, self.qweight, self.scales, self.bits,
                                                 self.group_size, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}")


def quantize_linears(module: nn.Module, bits: int = 8, group_size: int | None = None,
                     skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace every nn.Linear in `module` (in place) by a `WeightOnlyLinear`; returns
    `module`. group_size None: per output channel. A layer is left alone when its qualified
    name or its last name component is in `skip` (the LM head by default: its weight is
    often tied to the embedding, and its accuracy matters most)."""
    if bits not in BITS:
        raise ValueError(f"weight-only quantization: bits must be 4 or 8, got {bits}")
    skipped = set(skip)
    targets = [(name, child) for name, child in module.named_modules()
               if isinstance(child, nn.Linear) and name not in skipped
               and name.rsplit(".", 1)[-1] not in skipped]
    for name, linear in targets:
        if not name:
            raise ValueError("quantize_linears: the module itself is an nn.Linear; "
                             "use WeightOnlyLinear.from_linear")
        try:
            quantized = WeightOnlyLinear.from_linear(linear, bits, group_size)
        except ValueError as e:
            raise ValueError(f"cannot quantize {name or type(module).__name__}: {e}") from e
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, quantized)
    return module

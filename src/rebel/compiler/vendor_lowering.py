"""Lowering the vendor's `rbln_custom_ops` (rebel.device.vendor_ops) into our IR.

- `linear` and `custom_moe_glu` decompose into ATen GEMMs (addmm/mm, bmm), so they take the
  matrix units' timing, fusion, constant folding of transposed weights and tensor parallelism
  exactly as nn.Linear does.
- The ops that update caches in place reach us from torch.export as
  `auto_functionalized[_v2](op, ...)`: a functional call returning (out, *new caches). Each
  becomes one IR op with the vendor op as target and every argument positional, returning
  (out, *caches); its device kernel writes the caches in place (vendor_ops.INPLACE_RESULTS), so
  a cache that is a module buffer becomes a persistent device buffer updated in place, like
  `rbln::paged_attention`. A cache passed as a reshaped view (`cache.unsqueeze(2)`,
  `cache.view(...)`) is a view op in front and a view back to the buffer's shape behind.
"""
from __future__ import annotations

import math
import operator

import torch

from ..device import vendor_ops
from ..errors import CompileError
from ..ir import GETITEM, Op, Ref, TensorSpec, encode, target_name

_FUNCTIONALIZED = ("auto_functionalized", "auto_functionalized_v2")


def _linear(input, weight, bias=None):
    return torch.ops.aten.linear.default(input, weight, bias)


def _moe_glu(hidden_states, gate_proj_weight, up_proj_weight, down_proj_weight,
             masked_routing_weight, hidden_act="silu"):
    """Every expert on every token as batched GEMMs, weighted by the routing mask (zero for
    experts a token does not use): the dense form the vendor's masked-routing op describes."""
    act = vendor_ops._ACTIVATIONS.get(hidden_act)
    if act is None:
        raise CompileError(f"custom_moe_glu: hidden_act {hidden_act!r} is not one of "
                           f"{sorted(vendor_ops._ACTIVATIONS)}")
    experts = gate_proj_weight.shape[0]
    x = hidden_states.unsqueeze(0).expand(experts, *hidden_states.shape)     # [E, T, H]
    gate = torch.bmm(x, gate_proj_weight.transpose(1, 2))                    # [E, T, I]
    up = torch.bmm(x, up_proj_weight.transpose(1, 2))
    down = torch.bmm(act(gate) * up, down_proj_weight.transpose(1, 2))       # [E, T, H]
    return (down * masked_routing_weight.unsqueeze(-1)).sum(0)


def VENDOR_DECOMPOSITIONS() -> dict:  # noqa: N802  (a table, built when capture needs it)
    ops = torch.ops.rbln_custom_ops
    return {ops.linear.default: _linear, ops.custom_moe_glu.default: _moe_glu}


def is_functionalized(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") in _FUNCTIONALIZED


def _contiguous_strides(shape) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return strides[::-1]


def _is_reshape(size, stride, offset, base_shape) -> bool:
    """Whether the view (size, stride, offset) of a dense base is just a reshape of all of it."""
    if offset not in (0, None) or math.prod(size) != math.prod(base_shape):
        return False
    return all(s == c for n, s, c in zip(size, stride, _contiguous_strides(size)) if n != 1)


class FunctionalizedOps:
    """Lowers auto_functionalized nodes and the getitems that unpack them."""

    def __init__(self, names: dict, ops: list[Op]):
        self.names = names
        self.ops = ops
        # FX node -> (IR op name, number of op returns, base index -> (result index, view back))
        self.nodes: dict[torch.fx.Node, tuple] = {}

    def owns(self, node: torch.fx.Node) -> bool:
        return node.target is operator.getitem and node.args[0] in self.nodes

    def lower(self, node: torch.fx.Node) -> None:
        overload = node.args[0]
        target = target_name(overload)
        if target not in vendor_ops.MUTATED:
            raise CompileError(f"node {node.name}: {target} updates its inputs in place; only the "
                               f"device's cache ops may ({', '.join(sorted(vendor_ops.MUTATED))})")
        kwargs = dict(node.kwargs)
        v2 = "_all_bases" in kwargs
        bases = kwargs.pop("_all_bases", None)
        schema = overload._schema
        args, mutated_specs, by_base = [], [], {}
        n_returns = len(schema.returns)
        for a in schema.arguments:
            if not (a.alias_info is not None and a.alias_info.is_write):
                value = kwargs.get(a.name, a.default_value if a.has_default_value() else None)
                args.append(self._arg(node, value))
                continue
            if not v2:  # v1: the argument itself; result i is its new value
                base = kwargs[a.name]
                result = n_returns + len(mutated_specs)
                spec = TensorSpec.of(base.meta["val"])
                by_base[result] = (n_returns + len(mutated_specs), None)
                args.append(Ref(self.names[base]))
                mutated_specs.append(spec)
                continue
            index = kwargs.get(f"_{a.name}_base_index")
            if index is None:
                raise CompileError(f"node {node.name}: {target} got no tensor for {a.name}")
            base = bases[index]
            base_val = base.meta["val"]
            ref = Ref(self.names[base])
            size = kwargs.get(f"_{a.name}_size")
            view_back = None
            if size is not None:
                size = [int(s) for s in size]
                stride = [int(s) for s in kwargs[f"_{a.name}_stride"]]
                if not _is_reshape(size, stride, kwargs.get(f"_{a.name}_storage_offset"),
                                   base_val.shape):
                    raise CompileError(f"node {node.name}: {target} updates {a.name} through a "
                                       f"strided view {size} of a {list(base_val.shape)} buffer; "
                                       "pass the whole cache (a reshape of it) instead")
                name = f"{node.name}_{a.name}_view"
                spec = TensorSpec(tuple(size), TensorSpec.of(base_val).dtype)
                self.ops.append(Op(name, "aten.view.default", (ref, size), {}, spec, "view"))
                ref = Ref(name)
                view_back = list(base_val.shape)
            else:
                spec = TensorSpec.of(base_val)
            if n_returns + index in by_base:
                raise CompileError(f"node {node.name}: {target} updates two views of one buffer")
            by_base[n_returns + index] = (n_returns + len(mutated_specs), view_back)
            args.append(ref)
            mutated_specs.append(spec)
        outs = node.meta["val"]
        returns = tuple(TensorSpec.of(v) for v in outs[:n_returns])
        label = target.split(".")[1]
        self.ops.append(Op(node.name, target, tuple(args), {}, (*returns, *mutated_specs), label))
        self.names[node] = node.name
        self.nodes[node] = (node.name, n_returns, by_base)

    def lower_result(self, node: torch.fx.Node) -> None:
        source, n_returns, by_base = self.nodes[node.args[0]]
        index = node.args[1]
        val = node.meta["val"]
        if index < n_returns:
            self.ops.append(Op(node.name, GETITEM, (Ref(source), index), {}, TensorSpec.of(val), GETITEM))
        else:
            result, view_back = by_base[index]
            inner = f"{node.name}_view" if view_back else node.name
            spec = TensorSpec.of(val)
            self.ops.append(Op(inner, GETITEM, (Ref(source), result), {},
                               self._spec_of(source, result), GETITEM))
            if view_back:
                self.ops.append(Op(node.name, "aten.view.default", (Ref(inner), view_back), {},
                                   spec, "view"))
        self.names[node] = node.name

    def _spec_of(self, source: str, result: int) -> TensorSpec:
        op = next(o for o in reversed(self.ops) if o.name == source)
        return op.out[result]

    def _arg(self, node, value):
        if isinstance(value, torch.fx.Node):
            return Ref(self.names[value])
        if isinstance(value, (list, tuple)):
            return type(value)(self._arg(node, v) for v in value)
        try:
            encode(value)
        except TypeError as e:
            raise CompileError(f"node {node.name}: {e}") from None
        return value


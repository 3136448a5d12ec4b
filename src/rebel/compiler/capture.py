"""Capture: torch.export a module, decompose to core ATen, and lower the FX graph to our IR."""
from __future__ import annotations

import logging
import operator
import os
import warnings
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch.export.graph_signature import InputKind, OutputKind

from ..errors import CompileError
from ..ir import GETITEM, Graph, Op, Ref, TensorSpec, encode, target_name, to_torch_dtype
from .one_pass import export_decomposed
from .support import classify, has_host_kernel
from .vendor_lowering import FunctionalizedOps, VENDOR_DECOMPOSITIONS, is_functionalized

# Ops the device implements as one kernel, so torch.export must not decompose them. `linear`
# stays whole so its weight is read as stored: decomposed, a batched input turns it into
# expand(permute(weight)) + bmm, which constant folding would store densely per batch row.
KEEP_WHOLE = (torch.ops.aten.scaled_dot_product_attention.default, torch.ops.aten.linear.default)
ONE_PASS_ENV = "RBLN_CAPTURE_ONE_PASS"  # "0": always trace twice (export, then decompose)
log = logging.getLogger(__name__)


def capture(module: torch.nn.Module, example_inputs: Sequence,
            static: dict[int, str] | None = None) -> Graph:
    """Export `module` at the shapes of `example_inputs` and return the IR graph.

    static: example-input position -> name of a static-address buffer (a tensor a compile
    context marked): that input becomes a persistent device buffer of the graph instead of an
    input (see `_static_buffer_input`)."""
    if not isinstance(module, torch.nn.Module):
        raise CompileError(f"compile_from_torch expects a torch.nn.Module, got {type(module).__name__}")
    inputs = _check_example_inputs(example_inputs)
    static = dict(static or {})
    inputs = [_static_example(t) if i in static else t for i, t in enumerate(inputs)]
    inputs = _unaliased(inputs, static)
    was_training = module.training
    module.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = _export(module, tuple(inputs))
    except Exception as e:  # torch raises many types; users need one clear message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CompileError(f"could not capture {type(module).__name__} with torch.export at input "
                           f"shapes {[tuple(t.shape) for t in inputs]}: {type(e).__name__}: {first}") from e
    finally:
        module.train(was_training)
    return _lower(ep, static)


def one_pass_enabled() -> bool:
    return os.environ.get(ONE_PASS_ENV, "1").strip() != "0"


def _export(module: torch.nn.Module, inputs: tuple) -> torch.export.ExportedProgram:
    """The decomposed program: in one trace (`one_pass.export_decomposed`) unless
    RBLN_CAPTURE_ONE_PASS=0, and in two (export, then run_decompositions) when one pass fails,
    so the faster path can never make a model uncompilable."""
    if one_pass_enabled():
        try:
            return export_decomposed(module, inputs, _decompositions())
        except Exception as e:  # noqa: BLE001  (any failure: the two-pass path decides)
            log.debug("one-pass capture of %s failed (%s: %s); tracing twice",
                      type(module).__name__, type(e).__name__, e)
    return _export_two_pass(module, inputs)


def _export_two_pass(module: torch.nn.Module, inputs: tuple) -> torch.export.ExportedProgram:
    ep = torch.export.export(module, inputs, strict=False)
    return ep.run_decompositions(_decompositions())


def _static_example(t: torch.Tensor) -> torch.Tensor:
    """What export traces for a static input: its values never matter (the device buffer starts
    as zeros), so a meta example becomes an uninitialised CPU tensor of its shape (the host
    reserves the pages lazily; nothing reads them) and traces beside the CPU inputs."""
    return torch.empty(t.shape, dtype=t.dtype) if t.is_meta else t


def _unaliased(inputs: list[torch.Tensor], static: dict[int, str]) -> list[torch.Tensor]:
    """Copies of example inputs that share memory with an earlier one. torch.export traces
    aliased inputs as one value (`[x, x]` becomes a graph that reads its first input twice), but
    each position is its own input at run time, where the caller passes different tensors."""
    seen: list[torch.Tensor] = []
    out = []
    for i, t in enumerate(inputs):
        if i not in static and any(_shares_memory(t, u) for u in seen):
            t = torch.empty_like(t) if t.is_meta else t.clone()
        seen.append(t)
        out.append(t)
    return out


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    if a.is_meta or b.is_meta or a.numel() == 0 or b.numel() == 0:
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _decompositions() -> dict:
    """Core ATen, except ops the device runs whole (attention stays one fused kernel)."""
    table = torch.export.default_decompositions()
    for op in KEEP_WHOLE:
        table.pop(op, None)
    table.update(VENDOR_DECOMPOSITIONS())
    return table


def _check_example_inputs(example_inputs) -> list[torch.Tensor]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = [example_inputs]
    if not isinstance(example_inputs, (list, tuple)) or not example_inputs:
        raise CompileError("example_inputs must be a non-empty list of tensors, e.g. "
                           "example_inputs=[torch.randn(16, 16)]")
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            raise CompileError(f"example_inputs[{i}] is a {type(t).__name__}, expected a torch.Tensor")
        if t.device.type not in ("cpu", "meta"):
            raise CompileError(f"example_inputs[{i}] is on {t.device}; give CPU (or meta) tensors")
    return list(example_inputs)


def _lower(ep: torch.export.ExportedProgram, static: dict[int, str] | None = None) -> Graph:
    sig = ep.graph_signature
    static = static or {}
    names: dict[torch.fx.Node, str] = {}
    inputs: list[tuple[str, TensorSpec]] = []
    weights: dict[str, torch.Tensor] = {}
    mutable: set[str] = set()
    static_names: set[str] = set()
    by_arg: dict[str, str] = {}  # placeholder name -> our name (for user-input mutations)
    mutated_targets = {s.target for s in sig.output_specs if s.kind == OutputKind.BUFFER_MUTATION}
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    user_index = 0
    for node, spec in zip(placeholders, sig.input_specs):
        if spec.kind == InputKind.USER_INPUT and user_index in static:
            name = _static_buffer_input(node, static[user_index], weights)
            mutable.add(name)
            static_names.add(name)
            user_index += 1
        elif spec.kind == InputKind.USER_INPUT:
            name = f"input_{len(inputs) + 1}"
            inputs.append((name, _spec_of(node)))
            user_index += 1
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            name = spec.target
            source = ep.constants if spec.kind == InputKind.CONSTANT_TENSOR or (
                spec.kind == InputKind.BUFFER and not spec.persistent) else ep.state_dict
            tensor = source[spec.target]
            if not isinstance(tensor, torch.Tensor):
                raise CompileError(f"constant {spec.target!r} is a {type(tensor).__name__}; only "
                                   "tensor constants can be compiled")
            weights[name] = tensor.detach()
            if spec.target in mutated_targets:
                mutable.add(name)
        else:
            raise CompileError(f"unsupported graph input kind {spec.kind.name} for {node.name}")
        names[node] = name
        by_arg[node.name] = name

    ops: list[Op] = []
    out_node = None
    dropped = _dropped_nodes(ep.graph)
    functionalized = FunctionalizedOps(names, ops)
    for node in ep.graph.nodes:
        if node in dropped:
            continue
        if node.op == "call_function" and is_functionalized(node):
            functionalized.lower(node)
            continue
        if node.op == "call_function" and functionalized.owns(node):
            functionalized.lower_result(node)
            continue
        if node.op == "call_function":
            names[node] = node.name
            op = _lower_call(node, names)
            if op.target in _NEEDS_CONTIGUOUS and op.args and isinstance(op.args[0], Ref):
                ops.append(_contiguous(op))
            ops.append(op)
        elif node.op == "output":
            out_node = node
        elif node.op != "placeholder":
            raise CompileError(f"unsupported FX node {node.format_node()}")

    outputs, updates = [], {}
    for value, spec in zip(out_node.args[0], sig.output_specs):
        encoded = _arg(value, names)
        if spec.kind == OutputKind.USER_OUTPUT:
            outputs.append(encoded)
        elif spec.kind == OutputKind.BUFFER_MUTATION:
            updates[encoded.name] = spec.target
        elif spec.kind == OutputKind.USER_INPUT_MUTATION and by_arg.get(spec.target) in static_names:
            updates[encoded.name] = by_arg[spec.target]  # a static buffer written in place
        else:
            raise CompileError(f"the model mutates its input or uses output kind {spec.kind.name}; "
                               "compiled models must not modify their inputs in place")
    out_spec = torch.utils._pytree.treespec_dumps(ep.call_spec.out_spec)
    return Graph(inputs, weights, ops, outputs, out_spec, updates, mutable, static_names)


def _static_buffer_input(node: torch.fx.Node, name: str, weights: dict[str, torch.Tensor]) -> str:
    """A user input marked static becomes a persistent buffer named `name`: a meta tensor in
    `weights` (only its spec is compiled: the runtime's context registry owns the storage), and
    a mutable one, so constant folding never bakes its compile-time contents in even when this
    graph only reads it (a cross-attention cache written by another graph)."""
    spec = _spec_of(node)
    if name in weights:
        raise CompileError(f"static buffer name {name!r} is also a parameter or buffer of the model")
    weights[name] = torch.empty(spec.shape, dtype=to_torch_dtype(spec.dtype), device="meta")
    return name


def _dropped_nodes(graph: torch.fx.Graph) -> set:
    """Export-time checks and what only they read (the symbolic comparisons around a
    data-dependent `.item()`): nothing a run needs."""
    dropped: set = set()
    for node in reversed(list(graph.nodes)):
        if node.op != "call_function":
            continue
        if node.target in _checks() and not node.users:
            dropped.add(node)
        elif node.users and all(u in dropped for u in node.users) and not is_functionalized(node):
            dropped.add(node)
    return dropped


@lru_cache(maxsize=1)
def _checks() -> frozenset:
    """Export-time assertions (dtype/shape checks, scalar asserts) that compute nothing: shapes
    are static once compiled, so they hold by construction and would only cost host syncs."""
    aten = torch.ops.aten
    return frozenset({aten._assert_tensor_metadata.default, aten._assert_scalar.default,
                      aten.sym_constrain_range_for_size.default})


# ATen CPU kernels that require a dense input, while decompositions may hand them a permuted
# view (torch's own decomposed VAE decoder fails on group_norm). The device picks its layouts,
# so the compiler makes the layout explicit with a copy in front of them.
_NEEDS_CONTIGUOUS = frozenset({"aten.native_group_norm.default"})


def _contiguous(op: Op) -> Op:
    """A dense copy of `op`'s first input, which `op` then reads instead (rewires op.args)."""
    src = op.args[0]
    name = f"{op.name}_input_contiguous"
    op.args = (Ref(name), *op.args[1:])
    spec = op.out_specs[0] if op.out_specs else None
    return Op(name, "aten.clone.default", (src,), {"memory_format": torch.contiguous_format},
              spec, "contiguous")


# Arithmetic on data-dependent scalars (`.item()` results), as 0-d tensor ops on the device.
_SCALAR_ARITHMETIC = {operator.add: "aten.add.Tensor", operator.sub: "aten.sub.Tensor",
                      operator.mul: "aten.mul.Tensor"}
_SYM = (torch.SymInt, torch.SymFloat, torch.SymBool)


_INDEX_READERS = frozenset({torch.ops.aten.select.int, torch.ops.aten.slice.Tensor,
                            *_SCALAR_ARITHMETIC})
_COMPARISONS = frozenset({operator.ge, operator.gt, operator.le, operator.lt, operator.eq, operator.ne})


def _target_or_fn(node: torch.fx.Node):
    return node.target


def _scalar_readers(node: torch.fx.Node) -> list:
    """The nodes that read a data-dependent scalar as a value (not the export-time checks),
    following it through +, -, *."""
    out = []
    for user in node.users:
        if user.target in _COMPARISONS or user.target in _checks():
            continue
        if user.target in _SCALAR_ARITHMETIC:
            out += [r for r in _scalar_readers(user) if r.target not in _INDEX_READERS]
        out.append(user)
    return out


def _lower_call(node: torch.fx.Node, names: dict) -> Op:
    if isinstance(node.meta.get("val"), _SYM) and not isinstance(node.target, torch._ops.OpOverload):
        target = _SCALAR_ARITHMETIC.get(node.target)
        if target is None or not isinstance(node.meta["val"], torch.SymInt):
            raise CompileError(f"node {node.name}: {getattr(node.target, '__name__', node.target)} "
                               "on a data-dependent scalar (.item()) is not supported; only +, -, * "
                               "of integers and indexing with the result")
        return Op(node.name, target, _arg(tuple(node.args), names), {}, TensorSpec((), "int64"),
                  node.target.__name__)
    try:
        target = target_name(node.target)
    except TypeError:
        raise CompileError(f"node {node.name}: call target {node.target!r} is not an ATen op") from None
    if target != GETITEM and not target.startswith("aten.") and classify(target) is None:
        raise CompileError(f"node {node.name}: op {target} has no device kernel and no host path "
                           "(the host runs ATen ops only; decompose it into ATen ops or register "
                           "a decomposition before compiling)")
    if target != GETITEM and classify(target) is None and not has_host_kernel(target):
        raise CompileError(f"node {node.name}: op {target} has no device kernel and no host path "
                           "(PyTorch has no CPU kernel for it)")
    val = node.meta.get("val")
    if target == "aten._local_scalar_dense.default":
        # A data-dependent scalar (.item()): the device keeps it as a 0-d tensor that the ops
        # reading it (select, slice, +-*) take as their run-time index.
        readers = [u for u in _scalar_readers(node) if _target_or_fn(u) not in _INDEX_READERS]
        if readers:
            raise CompileError(f"node {node.name}: the model turns a tensor into a Python number "
                               f"(.item(), .tolist(), int(t)) that {readers[0].name} uses as a value; "
                               "compiled graphs keep such numbers only as indices (select, slice), "
                               "keep the value as a tensor")
        val = node.args[0].meta["val"].new_empty(())
    elif isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise CompileError(f"node {node.name} ({target}): arithmetic on a data-dependent scalar "
                           "(.item()) is not supported; index with the scalar directly")
    label = _label(node, target)
    try:
        args = _arg(tuple(node.args), names)
        kwargs = {k: _arg(v, names) for k, v in node.kwargs.items()}
    except TypeError as e:
        raise CompileError(f"node {node.name} ({target}): {e}") from None
    return Op(node.name, target, args, kwargs, _out(val), label)


def _label(node: torch.fx.Node, target: str) -> str:
    """The user-facing op name: the torch function the user called (linear), else the ATen op."""
    torch_fn = node.meta.get("torch_fn")
    if torch_fn and isinstance(torch_fn[1], str):
        return torch_fn[1].rsplit(".", 1)[-1]
    return GETITEM if target == GETITEM else target.split(".")[1]


def _arg(value, names: dict):
    if isinstance(value, torch.fx.Node):
        return Ref(names[value])
    if isinstance(value, (list, tuple)):
        items = [_arg(v, names) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, dict):
        return {k: _arg(v, names) for k, v in value.items()}
    encode(value)  # raises TypeError for values an artifact cannot hold
    return value


def _spec_of(node: torch.fx.Node) -> TensorSpec:
    out = _out(node.meta.get("val"))
    if not isinstance(out, TensorSpec):
        raise CompileError(f"input {node.name} is not a tensor")
    return out


def _out(val):
    if isinstance(val, torch.Tensor):
        if any(not isinstance(s, int) for s in val.shape):
            raise CompileError("dynamic shapes are not supported: the device runs static shapes")
        return TensorSpec.of(val)
    if isinstance(val, (list, tuple)):
        return tuple(_out(v) for v in val)
    return None


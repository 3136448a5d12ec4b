"""Generated code for device kernels: a run of kernels becomes one Python function.

The interpreter (`FunctionalKernel`) walks every op of every kernel on every run, resolving and
substituting arguments through dicts. `compile_block` writes the same sequence once as Python
source -- one line per op, arguments as locals, constants bound into the function's globals --
compiles it, and the runtime calls that function per run. The arithmetic is the very same ATen
calls in the same order, so results are bit-identical to the interpreter's.

Rounding follows the interpreter's rule (each kernel rounds its outputs once, after its last op)
but in place, in native code (`rounding.round_`), and only where it changes something:
  * a result computed fresh by the kernel is rounded in its own memory;
  * a view (permute, view, slice, ...) of a value the kernel received is skipped: every value a
    kernel receives is already rounded (weights, earlier kernels' outputs, cast-in inputs); so
    is a result that only moves or selects such values (clone, cat, embedding, gather, where,
    relu, max, ...: `EXACT_OPS`), since rounding a 16-bit value changes nothing;
  * a view of a value the kernel computed rounds that value's memory, and with it the view;
    so does a result of a multi-result kernel that is new memory (`ops.FRESH_RESULTS`);
  * anything else (a multi-result value, an op that may alias without being a view, a cast
    kernel reading the caller's tensor) gets a rounded copy, as the interpreter makes;
  * an output cast of a value this block computed (so rounded, in memory of its own) is skipped.
Values no later code reads stay locals and are freed at their last use; an elementwise op whose
operand dies there writes over it (`_in_place`), and ATen ops are called through their C++ entry
points (`_direct`), so a decode step pays neither an allocation nor a Python frame per op for them.
"""
from __future__ import annotations

import math

import torch

from ..ir import GETITEM, Op, Ref, TensorSpec, resolve_target, to_torch_dtype
from . import attention_layout, packed_linear, tail_fusion
from .ops import DEVICE_IMPLS, FASTER_IN_PLACE, FRESH_RESULTS, INPLACE_RESULTS, PLANNED, device_fn
from .rounding import round_copier, rounder

# ATen ops whose result always shares its input's memory (a layout, not a computation).
VIEW_OPS = frozenset("""view _unsafe_view unsqueeze squeeze expand slice select alias t transpose
    permute detach as_strided diagonal unfold narrow split_with_sizes split unbind chunk view_as
    expand_as movedim swapaxes""".split())

# Ops whose results are values of their inputs (moved, selected, sign-changed): on 16-bit inputs
# they give 16-bit values, which rounding leaves unchanged.
EXACT_OPS = frozenset("""clone cat flip roll repeat embedding index_select gather index.Tensor
    slice_scatter select_scatter where.self relu neg abs maximum minimum amax amin max.dim
    min.dim max.default min.default max_pool1d max_pool2d max_pool3d max_pool2d_with_indices
    max_pool3d_with_indices adaptive_max_pool1d adaptive_max_pool2d""".split())


def _op_name(target: str) -> str:
    return target.split(".")[1] if target.count(".") == 2 else target


def _may_alias(fn) -> bool:
    """Whether the op's schema says a result may share memory with an input."""
    schema = getattr(fn, "_schema", None)
    if schema is None:
        return True  # unknown callable: assume the worst
    return any(r.alias_info is not None for r in schema.returns)


class _Emitter:
    def __init__(self):
        self.names: dict[str, str] = {}
        self.globals: dict[str, object] = {}
        self.consts: dict[int, str] = {}

    def var(self, name: str) -> str:
        if name not in self.names:
            self.names[name] = f"v{len(self.names)}"
        return self.names[name]

    def const(self, value) -> str:
        key = id(value)
        if key not in self.consts:
            self.consts[key] = f"k{len(self.consts)}"
            # An ATen op is bound as the callable its OpOverload forwards to: the same kernel,
            # one Python frame less per call (thousands per LLM step).
            self.globals[self.consts[key]] = value._op if isinstance(value, torch._ops.OpOverload) \
                else value
        return self.consts[key]

    def expr(self, value) -> str:
        if isinstance(value, Ref):
            return self.var(value.name)
        if value is None or isinstance(value, (bool, int, str)):
            return repr(value)
        if isinstance(value, float):
            return repr(value) if math.isfinite(value) else self.const(value)
        if isinstance(value, (list, tuple)):
            if not any(isinstance(v, Ref) for v in _flatten(value)):
                return self.const(value)
            items = ", ".join(self.expr(v) for v in value)
            return f"[{items}]" if isinstance(value, list) else f"({items},)"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k!r}: {self.expr(v)}" for k, v in value.items()) + "}"
        return self.const(value)


def _flatten(value):
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _flatten(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    else:
        yield value


class CompiledBlock:
    """Kernels (each: its ops and the outputs it rounds) run as one generated function.

    kernels: (ops, outputs) per kernel; a kernel without ops is a cast that rounds its outputs
    (the input cast reads the caller's tensor, so it always writes a copy). keep: the values code
    outside the block reads (stored into the environment); everything else stays local.
    shared: values that stay on the device too (buffer updates), whose output cast must copy.
    packed: weights the environment holds packed for their linears (packed_linear), which a linear
    reading them takes in that form."""

    def __init__(self, kernels: list[tuple[list[Op], list[str]]], dtype: str, keep: set[str],
                 name: str = "block", shared: frozenset = frozenset(),
                 packed: dict | None = None):
        self.dtype = to_torch_dtype(dtype)
        kernels = tail_fusion.rewrite(attention_layout.rewrite(kernels, keep), keep, self.dtype, packed,
                                      VIEW_OPS)
        self.source, namespace = _generate(kernels, keep, name, shared, packed)
        namespace.update(R=rounder(self.dtype), C=round_copier(self.dtype), D=self.dtype)
        code = compile(self.source, f"<rbln {name}>", "exec")
        exec(code, namespace)  # noqa: S102 - our own generated source, from the program's ops
        self.fn = namespace[name]

    def __call__(self, env: dict) -> None:
        self.fn(env)


def _generate(kernels, keep: set[str], name: str, shared: frozenset,
              packed: dict | None = None) -> tuple[str, dict]:
    packed = packed or {}
    em = _Emitter()
    body: list[str] = []
    produced: dict[str, Op] = {}
    loaded: set[str] = set()
    lines_of_use: dict[str, int] = {}
    own: set[str] = set()  # rounded values in memory this block allocated
    stmts: list[tuple[str, list[str]]] = []  # (line, names it reads)

    def load(ref: str) -> None:
        if ref not in produced and ref not in loaded:
            loaded.add(ref)
            stmts.append((f"{em.var(ref)} = env[{ref!r}]", []))

    plans: dict[tuple, str] = {}  # a planned kernel's shared per-run work, by its arguments
    readers: dict[str, int] = {}  # value -> ops of the block that read it
    for ops, _ in kernels:
        for op in ops:
            for r in op.refs:
                readers[r] = readers.get(r, 0) + 1

    for index, (ops, outputs) in enumerate(kernels):
        inside: dict[str, Op] = {}
        if not ops:  # a cast kernel: rounded copies, as the device's cast writes a new buffer
            for o in outputs:
                if o in own and o not in shared:
                    continue  # computed here, rounded already: the copy would change nothing
                load(o)
                stmts.append((f"{em.var(o)} = C({em.var(o)}, D)", [o]))
            continue
        for op in ops:
            weight = packed_linear.linear_weight(op, packed)
            looked_up = packed_linear.lookup_weight(op, packed)
            refs = [r + packed_linear.SUFFIX if r in (weight, looked_up) else r for r in op.refs]
            for r in refs:
                load(r)
            fn = None if op.target == GETITEM else \
                tail_fusion.FUSED.get(op.target) or _direct(device_fn(op.target))
            out = em.var(op.name)
            planned = PLANNED.get(op.target)
            if op.target == GETITEM:
                line = f"{out} = {em.expr(op.args[0])}[{em.expr(op.args[1])}]"
            elif weight is not None:
                args = [em.expr(a) for a in op.args]
                args[1] = em.var(weight + packed_linear.SUFFIX)
                line = f"{out} = {em.const(packed_linear.linear)}({', '.join(args)})"
            elif looked_up is not None:
                args = [em.var(looked_up + packed_linear.SUFFIX)] + [em.expr(a) for a in op.args[1:]]
                line = f"{out} = {em.const(packed_linear.lookup)}({', '.join(args)})"
            elif planned is not None and not op.kwargs and len(op.args) > max(planned[1]):
                make, at, kernel = planned
                key = (op.target,) + tuple(em.expr(op.args[i]) for i in at)
                if key not in plans:  # once per run, before the first kernel that uses it
                    plans[key] = f"plan{len(plans)}"
                    reads = [a.name for i in at if isinstance(a := op.args[i], Ref)]
                    stmts.append((f"{plans[key]} = {em.const(make)}({', '.join(key[1:])})", reads))
                args = [plans[key]] + [em.expr(a) for i, a in enumerate(op.args) if i not in at]
                line = f"{out} = {em.const(kernel)}({', '.join(args)})"
            elif _moves(op, produced, readers, keep):
                line = f"{out} = {em.expr(op.args[0])}"
            elif (in_place := _in_place(op, produced, readers, keep)) is not None:
                fn_, args = in_place
                kwargs = [f"{k}={em.expr(v)}" for k, v in op.kwargs.items()]
                dense = " and ".join(f"{em.expr(a)}.is_contiguous()" for a in args if isinstance(a, Ref))
                line = (f"{out} = {em.const(fn_)}({', '.join([em.expr(a) for a in args] + kwargs)}) "
                        f"if {dense} else {em.const(fn)}({', '.join([em.expr(a) for a in op.args] + kwargs)})")
            else:
                args = [em.expr(a) for a in op.args]
                args += [f"{k}={em.expr(v)}" for k, v in op.kwargs.items()]
                line = f"{out} = {em.const(fn)}({', '.join(args)})"
            stmts.append((line, refs))
            inside[op.name] = op
            produced[op.name] = op
        stmts.extend(_rounding(ops, outputs, inside, em, own))
    # Stores and frees: a value read outside the block goes to env; locals die at last use.
    for i, (_, reads) in enumerate(stmts):
        for r in reads:
            lines_of_use[r] = i
    stored = [n for n in produced if n in keep] + [n for n in loaded if n in keep and n in
                                                    _rebound(kernels)]
    for i, (line, reads) in enumerate(stmts):
        body.append(line)
        dead = [r for r in dict.fromkeys(reads) if lines_of_use.get(r) == i and r not in keep]
        if dead:
            body.append("del " + ", ".join(em.var(r) for r in dead))
    body += [f"env[{n!r}] = {em.var(n)}" for n in dict.fromkeys(stored)]
    source = f"def {name}(env):\n" + "".join(f"    {line}\n" for line in body or ["pass"])
    return source, dict(em.globals)


def _direct(fn):
    """An ATen OpOverload's C++ entry point: `OpOverload.__call__` only forwards to it, and that
    Python frame is a few hundred of a decode step's microseconds."""
    return fn._op if isinstance(fn, torch._ops.OpOverload) else fn


def _moves(op: Op, produced: dict, readers: dict, keep: set) -> bool:
    """A plain clone of a value this block computed that nothing else reads (an eval dropout
    becomes one): the clone would copy memory nobody else can see, so the result takes the
    value's memory instead. Same values, one allocation and copy less."""
    if op.target != "aten.clone.default" or op.kwargs or len(op.args) != 1:
        return False
    src = op.args[0]
    return isinstance(src, Ref) and src.name in produced and readers.get(src.name) == 1 \
        and src.name not in keep


def _in_place(op: Op, produced: dict, readers: dict, keep: set):
    """(in-place op, its arguments) when an elementwise op can write its result over an operand
    that dies here: a full-shape value of the result's dtype, computed by this block in memory of
    its own, that nothing else reads or keeps (a GELU over its linear's output, a residual add).
    Eager PyTorch does the same (`gelu_` after `addmm`); it saves an allocation and a pass over
    fresh memory. The generated line takes it only when the operands are contiguous, where the
    in-place result has the layout the op would have given; add and mul may swap their operands
    (IEEE addition and multiplication are commutative), so either one may be the one that dies."""
    target = _IN_PLACE.get(op.target)
    out = op.out
    if target is None or not isinstance(out, TensorSpec):
        return None
    args = list(op.args)
    order = [0, 1] if op.target in _COMMUTATIVE and not op.kwargs and len(args) == 2 else [0]
    for i in order:
        a = args[i] if i < len(args) else None
        if not isinstance(a, Ref) or readers.get(a.name) != 1 or a.name in keep:
            continue
        src = produced.get(a.name)
        if src is None or not isinstance(src.out, TensorSpec) or not _owns_memory(src, produced, readers, keep):
            continue
        if tuple(src.out.shape) != tuple(out.shape) or src.out.dtype != out.dtype:
            continue
        if i == 1:
            args = [args[1], args[0]]
        return FASTER_IN_PLACE.get(op.target) or _direct(resolve_target(target)), args
    return None


def _owns_memory(op: Op, produced: dict, readers: dict, keep: set) -> bool:
    """Whether op's result is memory this block allocated for it alone. A clone that `_moves`
    elided is its source's memory (which may be a view of a weight): follow it."""
    while op.target == "aten.clone.default" and _moves(op, produced, readers, keep):
        op = produced[op.args[0].name]
    return op.name in produced and _view_base(op, produced) == op.name


# Elementwise ops and their in-place forms (same kernel, written over the first operand).
_IN_PLACE = {f"aten.{n}.{o}": f"aten.{n}_.{o}" for n, o in (
    ("gelu", "default"), ("relu", "default"), ("silu", "default"), ("sigmoid", "default"),
    ("tanh", "default"), ("exp", "default"), ("neg", "default"), ("rsqrt", "default"),
    ("add", "Tensor"), ("sub", "Tensor"), ("mul", "Tensor"), ("div", "Tensor"),
    ("add", "Scalar"), ("mul", "Scalar"))}
_COMMUTATIVE = frozenset({"aten.add.Tensor", "aten.mul.Tensor"})


def _rebound(kernels) -> set[str]:
    """Values a cast kernel of this block replaces by a rounded copy (read from env, stored back)."""
    return {o for ops, outputs in kernels if not ops for o in outputs}


def _exact(ops: list[Op]) -> set[str]:
    """Values of the kernel that are 16-bit values already: views and EXACT_OPS results of
    values the kernel received (all rounded) or of such values, and non-float results."""
    exact: set[str] = set()
    inside = {op.name for op in ops}
    for op in ops:
        name = _op_name(op.target)
        key = op.target.removeprefix("aten.")
        listed = key in EXACT_OPS or key.removesuffix(".default") in EXACT_OPS
        if isinstance(op.out, TensorSpec) and not op.out.is_float or op.target in tail_fusion.FUSED:
            exact.add(op.name)  # integers, or a fused tail, which rounds its result itself
        elif op.target == GETITEM or name in VIEW_OPS or listed:
            if all(r in exact or r not in inside for r in op.refs) and op.target not in DEVICE_IMPLS:
                exact.add(op.name)
    return exact


def _rounding(ops: list[Op], outputs: list[str], inside: dict[str, Op], em: _Emitter, own: set):
    """Statements rounding one kernel's outputs (see the module docstring for the rule); adds
    to `own` the outputs that end up rounded in memory the block allocated."""
    in_place = {(op.name, i) for op in ops for i in INPLACE_RESULTS.get(op.target, ())}
    exact = _exact(ops)
    flags: dict[str, str] = {}
    stmts = []
    for o in outputs:
        op = inside[o]
        if op.target == GETITEM and (op.refs[0], op.args[1]) in in_place:
            continue  # a cache the kernel updated in place: device values already
        if isinstance(op.out, tuple) or op.out is None:
            stmts.append((f"{em.var(o)} = C({em.var(o)}, D)", [o]))
            own.add(o)
            continue
        base = _view_base(op, inside)
        if o in exact:  # 16-bit values already (views or moves of rounded values, integers)
            if base is not None and base in inside and op.out.is_float:
                own.add(o)
            continue
        if base is None:
            stmts.append((f"{em.var(o)} = C({em.var(o)}, D)", [o]))
            own.add(o)
            continue
        if base not in inside:
            continue  # a view of a value the kernel received: rounded already
        own.add(o)
        if base not in flags:
            flags[base] = f"ok{len(em.names)}_{len(flags)}"
            stmts.append((f"{flags[base]} = R({em.var(base)}, D)", [base]))
        stmts.append((f"if not {flags[base]}: {em.var(o)} = C({em.var(o)}, D)", [o]))
    return stmts


def _view_base(op: Op, inside: dict[str, Op]) -> str | None:
    """The value whose memory `op`'s result lives in: op itself when it computes a new tensor,
    the viewed value for views (followed through views the kernel made); None when the op may
    alias without being a view (reshape, contiguous, unknown callables)."""
    while True:
        if op.target == GETITEM:
            src = inside.get(op.refs[0])
            if src is None:
                return op.refs[0]
            if _op_name(src.target) not in VIEW_OPS:
                if op.args[1] in FRESH_RESULTS.get(src.target, ()):
                    return op.name
                if src.target in DEVICE_IMPLS or _may_alias(resolve_target(src.target)):
                    return None
                return op.name
            op = src
        name = _op_name(op.target)
        if op.target in tail_fusion.FUSED:
            return op.name  # a new tensor
        if name in VIEW_OPS:
            if not op.args or not isinstance(op.args[0], Ref):
                return None
            src = op.args[0].name
            if src not in inside:
                return src
            op = inside[src]
            continue
        if op.target in DEVICE_IMPLS or _may_alias(resolve_target(op.target)):
            return None
        return op.name

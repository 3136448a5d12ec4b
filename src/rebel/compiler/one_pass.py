"""Capture in one trace: torch.export with the decomposition table applied while tracing.

`torch.export.export(module, strict=False)` traces the module once (pre-dispatch, training IR)
and `ep.run_decompositions(table)` traces the result a second time, through AOT dispatch, to
apply the table. For a 30-layer LLM the two traces are most of the compile time. Here the module
is traced once, straight through AOT dispatch, with the table applied during that trace: torch's
own `torch.export._trace._export(..., pre_dispatch=False)`, with `_export_to_aten_ir` given the
table's Python decompositions and the CompositeImplicitAutograd ops it keeps whole
(`aten.linear`, `scaled_dot_product_attention`) overridden exactly as `run_decompositions` does
(`_split_decomp_table_to_cia_and_python_decomp`, `_override_composite_implicit_decomp`).

The program must be the one two-pass capture produces, down to op names, labels and weight order
(a compiled artifact must not depend on which path built it), so the differences between the
two paths are undone here:

- tied weights: one tensor under two names. The second trace reads every use through the last
  name of the group; one pass reads each use through the name its module used.
- input order: the second trace lifts buffers and constants in the order of the first trace's
  unlifted module (constants registered as buffers where they live), not buffers then constants.
- buffer mutations: the retrace drops the `copy` that writes a mutated buffer back when the
  output is that copy (`_remove_unnecessary_copy_op_pass`); so does one pass here.
- `torch.tensor(...)` constants trace as `lift_fresh_copy`, which the second trace turns into
  `clone`; node names are renumbered the way a fresh trace numbers them.
- labels (`torch_fn` metadata, which `capture._label` shows users): the first trace wraps
  grad-mode regions (`torch.no_grad()` against grad-enabled ambient) and autocast regions in
  higher-order ops, and the second trace labels every op inside with the wrapper; one pass sees
  the ops themselves. `.float()`/`.half()` on a functional tensor call `.to()`, which one pass
  records instead of the method the user called. Both are recorded during the trace and
  relabelled like the two-pass program.

Nodes carry no `stack_trace` metadata (the source line of each op): extracting a Python
traceback per node cost about 4 s of SmolLM2's 25 s compile (benchmarks/compile_time.py), and
nothing below capture reads it (the IR has no place for it); a model that fails is reported by
the two-pass fallback, which has it.

torch gives no public hook for the table, so `_export_to_aten_ir` (and the metadata hooks
below) are patched for the duration of the trace, under one process-wide lock: two captures do
not run this path at the same time. Anything this module cannot reproduce raises (e.g. a model
that calls `torch._C._set_grad_enabled` itself, whose regions it cannot see); capture then
falls back to the two-pass path.
"""
from __future__ import annotations

import contextlib
import functools
import re
import threading
from collections.abc import Sequence

import torch
from torch.export.graph_signature import InputKind

_LOCK = threading.Lock()
_STATE = threading.local()  # .recorder: the _Regions of the trace running in this thread

# Tensor methods FunctionalTensor forwards to `.to()` (torch/_subclasses/functional_tensor.py)
_CONVERSIONS = ("char", "cpu", "bfloat16", "byte", "double", "float", "bool", "half", "int", "long")
GRAD_LABEL = ("wrap_with_set_grad_enabled", "WrapWithSetGradEnabled.wrap_with_set_grad_enabled")
AUTOCAST_LABEL = ("wrap_with_autocast", "WrapWithAutocast.wrap_with_autocast")


def export_decomposed(module: torch.nn.Module, inputs: Sequence, decomp_table: dict
                      ) -> torch.export.ExportedProgram:
    """`torch.export.export(module, inputs, strict=False).run_decompositions(decomp_table)` in
    one trace. Raises whatever torch raises, or RuntimeError where the result would differ."""
    from torch.export import _trace
    from torch.export.exported_program import (_override_composite_implicit_decomp,
                                               _remove_unnecessary_copy_op_pass,
                                               _split_decomp_table_to_cia_and_python_decomp)

    table = decomp_table.materialize() if hasattr(decomp_table, "materialize") else dict(decomp_table)
    cia_to_decomp, python_table = _split_decomp_table_to_cia_and_python_decomp(table)
    regions = _Regions(torch.is_grad_enabled())
    with _LOCK:
        original = _trace._export_to_aten_ir
        stack_traces = torch.fx.config.do_not_emit_stack_traces
        _trace._export_to_aten_ir = functools.partial(original, decomp_table=python_table)
        torch.fx.config.do_not_emit_stack_traces = True
        try:
            with _override_composite_implicit_decomp(cia_to_decomp), _recording(module, regions):
                ep = _trace._export(module, tuple(inputs), strict=False, pre_dispatch=False)
        finally:
            _trace._export_to_aten_ir = original
            torch.fx.config.do_not_emit_stack_traces = stack_traces
    _read_ties_through_last_name(ep)
    _lift_fresh_as_clone(ep)
    _order_inputs_like_retrace(ep)
    # as the retrace does; it also recompiles the graph module after the fix-ups above
    _remove_unnecessary_copy_op_pass(ep.graph_module, ep.graph_signature)
    return ep


# --- labels ------------------------------------------------------------------------------------

class _Regions:
    """What the pre-dispatch trace would have wrapped in a higher-order op, tracked while one
    pass traces: the grad mode the model's code asked for (the trace itself runs under no_grad,
    so `torch.is_grad_enabled()` cannot tell) and the autocast blocks it is in."""

    def __init__(self, ambient_grad: bool):
        self.ambient = ambient_grad
        self.grad = ambient_grad
        self.clock = 0
        self.grad_since = 0      # when the grad mode was last set (pre-dispatch splits there)
        self.autocast: list[int] = []  # entry times of the open autocast blocks
        self.conversion: list = []  # open .float()-style calls: their inner .to() is not theirs
        self.muted = 0           # inside a grad-mode context manager's own enter/exit

    @contextlib.contextmanager
    def mute(self):
        self.muted += 1
        try:
            yield
        finally:
            self.muted -= 1

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def label(self):
        grad = self.grad != self.ambient
        if self.autocast and (not grad or self.autocast[0] < self.grad_since):
            return AUTOCAST_LABEL
        return GRAD_LABEL if grad else None


def _recorder() -> _Regions | None:
    return getattr(_STATE, "recorder", None)


@contextlib.contextmanager
def _recording(module: torch.nn.Module, regions: _Regions):
    """Install the hooks (class attributes, so for every thread; each hook acts only in the
    thread whose trace it records, and only while `module`'s forward runs: export's own
    `torch.no_grad()` around the trace is not the model's) and restore them afterwards."""
    from torch._subclasses.functional_tensor import FunctionalTensor
    from torch.autograd import grad_mode
    from torch.fx.experimental import proxy_tensor

    patches = [(proxy_tensor.TorchFunctionMetadataMode, "__torch_function__", _torch_function),
               (proxy_tensor.PythonKeyTracer, "create_node", _create_node),
               (torch.amp.autocast_mode.autocast, "__enter__", _autocast_enter),
               (torch.amp.autocast_mode.autocast, "__exit__", _autocast_exit),
               (grad_mode.no_grad, "__enter__", _grad_enter(lambda self: False)),
               (grad_mode.no_grad, "__exit__", _grad_exit),
               (grad_mode.enable_grad, "__enter__", _grad_enter(lambda self: True)),
               (grad_mode.enable_grad, "__exit__", _grad_exit),
               (grad_mode.set_grad_enabled, "__init__", _set_grad_init),
               (grad_mode.set_grad_enabled, "__enter__", _grad_enter(lambda self: self.mode)),
               (grad_mode.set_grad_enabled, "__exit__", _grad_exit),
               *((FunctionalTensor, name, _conversion(name)) for name in _CONVERSIONS)]
    saved = [(cls, name, cls.__dict__[name]) for cls, name, _ in patches]
    for cls, name, hook in patches:
        setattr(cls, name, hook(cls.__dict__[name]))
    def start(*_):
        _STATE.recorder = regions

    def stop(*_):
        _STATE.recorder = None

    handles = [module.register_forward_pre_hook(start, prepend=True),
               module.register_forward_hook(stop, always_call=True)]
    try:
        yield
    finally:
        _STATE.recorder = None
        for handle in handles:
            handle.remove()
        for cls, name, original in saved:
            setattr(cls, name, original)


def _torch_function(original):
    @functools.wraps(original)
    def hook(self, func, types, args=(), kwargs=None):
        regions = _recorder()
        if regions is not None and func is torch._C._set_grad_enabled and not regions.muted:
            raise RuntimeError("one-pass capture: the model sets the grad mode other than with "
                               "no_grad / enable_grad / set_grad_enabled; its regions are unknown")
        if regions is not None and regions.conversion and getattr(func, "__name__", "") == "to":
            method = regions.conversion[-1]  # record it as the pre-dispatch trace does
            self.tracer.torch_fn_metadata = method
            self.tracer.torch_fn_counts[method] = self.tracer.torch_fn_counts.get(method, 0) + 1
            return func(*args, **(kwargs or {}))
        return original(self, func, types, args, kwargs)
    return hook


def _conversion(name):
    method = getattr(torch.Tensor, name)

    def patch(original):
        @functools.wraps(original)
        def hook(self, *args, **kwargs):
            regions = _recorder()
            if regions is None:
                return original(self, *args, **kwargs)
            regions.conversion.append(method)
            try:
                return original(self, *args, **kwargs)
            finally:
                regions.conversion.pop()
        return hook
    return patch


def _create_node(original):
    @functools.wraps(original)
    def hook(self, *args, **kwargs):
        node = original(self, *args, **kwargs)
        regions = _recorder()
        if regions is not None and node.op == "call_function":
            label = regions.label()
            if label is not None:
                node.meta["torch_fn"] = label
        return node
    return hook


def _autocast_enter(original):
    @functools.wraps(original)
    def hook(self):
        regions = _recorder()
        if regions is not None:
            regions.autocast.append(regions.tick())
        return original(self)
    return hook


def _autocast_exit(original):
    @functools.wraps(original)
    def hook(self, *exc):
        regions = _recorder()
        if regions is not None and regions.autocast:
            regions.autocast.pop()
        return original(self, *exc)
    return hook


def _grad_enter(mode_of):
    def patch(original):
        @functools.wraps(original)
        def hook(self):
            regions = _recorder()
            if regions is not None:
                self._rbln_prev_grad = regions.grad
                regions.grad, regions.grad_since = bool(mode_of(self)), regions.tick()
                with regions.mute():  # no_grad enters through set_grad_enabled(False)
                    return original(self)
            return original(self)
        return hook
    return patch


def _grad_exit(original):
    @functools.wraps(original)
    def hook(self, *exc):
        regions = _recorder()
        if regions is not None and hasattr(self, "_rbln_prev_grad"):
            regions.grad, regions.grad_since = self._rbln_prev_grad, regions.tick()
            with regions.mute():
                return original(self, *exc)
        return original(self, *exc)
    return hook


def _set_grad_init(original):
    @functools.wraps(original)
    def hook(self, mode):
        regions = _recorder()
        if regions is not None and not regions.muted:
            self._rbln_prev_grad = regions.grad
            regions.grad, regions.grad_since = bool(mode), regions.tick()
            with regions.mute():
                return original(self, mode)
        return original(self, mode)
    return hook


# --- program fix-ups ---------------------------------------------------------------------------

def _placeholders(ep) -> list[torch.fx.Node]:
    return [n for n in ep.graph.nodes if n.op == "placeholder"]


def _read_ties_through_last_name(ep) -> None:
    """Every use of a tied parameter or buffer goes through the last of its names."""
    by_tensor: dict[int, list[torch.fx.Node]] = {}
    for node, spec in zip(_placeholders(ep), ep.graph_signature.input_specs):
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            source = ep.state_dict if spec.target in ep.state_dict else ep.constants
            tensor = source.get(spec.target)
            if isinstance(tensor, torch.Tensor):
                by_tensor.setdefault(id(tensor), []).append(node)
    for group in by_tensor.values():
        for node in group[:-1]:
            node.replace_all_uses_with(group[-1])


_CLONE_NAME = re.compile(r"^(clone|lift_fresh_copy)(_\d+)?$")


def _lift_fresh_as_clone(ep) -> None:
    """`lift_fresh_copy` (a `torch.tensor(...)` constant) becomes `clone`, and the clones are
    renumbered in graph order (clone, clone_1, ...) as the second trace names them."""
    nodes = [n for n in ep.graph.nodes if n.op == "call_function"]
    lifts = [n for n in nodes if n.target is torch.ops.aten.lift_fresh_copy.default]
    if not lifts:
        return
    for node in lifts:
        node.target = torch.ops.aten.clone.default
    clones = [n for n in nodes if n.target is torch.ops.aten.clone.default]
    if any(not _CLONE_NAME.match(n.name) for n in clones):
        raise RuntimeError("one-pass capture: a clone node has an unexpected name; cannot "
                           "renumber like two-pass")
    for node in clones:
        node.name = f"_rbln_tmp_{node.name}"  # free every clone name before reusing them
    for i, node in enumerate(clones):
        node.name = "clone" if i == 0 else f"clone_{i}"
    taken = {n.name for n in ep.graph.nodes} - {n.name for n in clones}
    if any(n.name in taken for n in clones):
        raise RuntimeError("one-pass capture: renumbered clone collides with another node name")


def _order_inputs_like_retrace(ep) -> None:
    """Parameters, then buffers and constants in the order the second trace lifts them: that of
    `named_parameters` / `named_buffers` of the first program's unlifted module (`ep.module()`)
    once `run_decompositions` has registered its constants as buffers. Building that module
    costs seconds for an LLM, so its attribute tree is rebuilt here from the signature, in the
    order `torch.export._unlift._register_attrs_to_new_gm` assigns it: buffers, parameters,
    constants, into submodules that already exist in the order of the signature (as in the
    module it unlifts); then the constants become buffers, appended where they live."""
    specs = list(ep.graph_signature.input_specs)
    placeholders = _placeholders(ep)
    if len(specs) != len(placeholders):
        raise RuntimeError("one-pass capture: signature and placeholders disagree")
    lifted = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    if any(s.kind not in lifted + (InputKind.USER_INPUT,) for s in specs):
        raise RuntimeError("one-pass capture: input kinds other than parameters, buffers, "
                           "constants and user inputs")
    if not any(s.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR) for s in specs):
        return  # parameters keep their order; nothing to interleave
    rank = {name: i for i, name in enumerate(_unlifted_order(specs))}
    items = list(zip(specs, placeholders))
    state = [(s, n) for s, n in items if s.kind in lifted]
    users = [(s, n) for s, n in items if s.kind not in lifted]
    state.sort(key=lambda sn: (sn[0].kind != InputKind.PARAMETER, rank[sn[0].target]))
    new = state + users
    if [s for s, _ in new] == specs:
        return
    previous = None
    for _, node in new:  # placeholders in the new order, ahead of everything else
        if previous is None:
            head = next(iter(ep.graph.nodes))
            if node is not head:
                head.prepend(node)
        else:
            previous.append(node)
        previous = node
    ep.graph_signature.input_specs[:] = [s for s, _ in new]


class _Attrs:
    """One module of the unlifted module's attribute tree: children, parameter and buffer names
    in registration order."""

    def __init__(self):
        self.children: dict[str, _Attrs] = {}
        self.parameters: list[str] = []
        self.buffers: list[str] = []

    def at(self, name: str) -> _Attrs:
        module = self
        for part in name.split(".")[:-1]:
            module = module.children.setdefault(part, _Attrs())
        return module

    def walk(self):
        yield self
        for child in self.children.values():
            yield from child.walk()


def _unlifted_order(specs) -> list[str]:
    root = _Attrs()
    constants = [s.target for s in specs if s.kind == InputKind.CONSTANT_TENSOR]
    for s in specs:  # the unlifted module's submodules exist in signature order
        if s.target is not None:
            root.at(s.target)
    for s in specs:
        if s.kind == InputKind.BUFFER:
            root.at(s.target).buffers.append(s.target)
    for s in specs:
        if s.kind == InputKind.PARAMETER:
            root.at(s.target).parameters.append(s.target)
    for name in constants:  # plain attributes first (their modules are created now)
        root.at(name)
    for name in constants:  # then registered as buffers, in graph order
        root.at(name).buffers.append(name)
    modules = list(root.walk())
    return [n for m in modules for n in m.parameters] + [n for m in modules for n in m.buffers]

"""Fusion: group a device segment's ops into kernels.

A kernel starts at an anchor (GEMM, conv, reduction, data movement...) and absorbs the
element-wise ops that follow and read its results, so intermediates never leave SRAM and are
rounded only where the kernel writes them out (linear+bias+relu is one kernel; an intermediate
that later kernels also read becomes an extra output).
A chain of element-wise ops may also feed a row reduction in the same kernel (x*x then mean in
RMSNorm). Views (alias ops) are free and join whatever kernel is open.

With fusion off (`fuse(..., enabled=False)`, the `fusion=False` compile option) every op that
computes is its own kernel, as PyTorch eager launches one kernel per op; each kernel then rounds
its own output to the device dtype. Views still join the open kernel: eager launches none for them.
"""
from __future__ import annotations

from ..ir import GETITEM, Op

EPILOGUE_KINDS = ("elementwise", "alias")
CLONE = "aten.clone.default"
PROLOGUE_TARGETS = ("reduction", "norm", "softmax")  # may consume an element-wise chain


def fuse(ops: list[Op], users: dict[str, list[str]], enabled: bool = True) -> list[list[Op]]:
    if not enabled:
        return _one_kernel_per_op(ops)
    kinds = {op.name: op.kind for op in ops}
    groups: list[list[Op]] = []
    for op in ops:
        group = groups[-1] if groups else None
        alone = op.kind == "collective" or (group is not None and group[-1].kind == "collective")
        # An element-wise op whose only readers are reductions opens their kernel instead of
        # closing the previous one: x*x inside RMSNorm must not be rounded (or overflow) to 16 bits.
        if op.kind == "elementwise" and group is not None and not _only_elementwise(group) and \
                users.get(op.name) and all(kinds.get(u) in PROLOGUE_TARGETS for u in users[op.name]):
            alone = True
        if not alone and group is not None and (_only_alias(group) or _can_absorb(group, op, users)):
            group.append(op)
        else:
            groups.append([op])
    return groups


def _one_kernel_per_op(ops: list[Op]) -> list[list[Op]]:
    """Unfused grouping: a new kernel for every non-alias op. An alias op (a view, or a getitem
    unpacking a multi-output op) joins the open kernel when it reads a value made there, and a
    compute op may join a kernel holding only views, exactly as in the fused path."""
    groups: list[list[Op]] = []
    for op in ops:
        group = groups[-1] if groups else None
        if group is not None and op.kind != "collective" and group[-1].kind != "collective" and (
                _only_alias(group) or (op.kind == "alias" and
                                       {o.name for o in group}.intersection(op.refs))):
            group.append(op)
        else:
            groups.append([op])
    return groups


def _only_elementwise(group: list[Op]) -> bool:
    return all(o.kind in EPILOGUE_KINDS for o in group)


def _only_alias(group: list[Op]) -> bool:
    return all(o.kind == "alias" for o in group)


def _can_absorb(group: list[Op], op: Op, users: dict[str, list[str]]) -> bool:
    if op.target == CLONE and op.refs and op.refs[0] in {o.name for o in group} \
            and group[-1].name == op.refs[0] and group[-1].kind == "data":
        # A contiguous copy of what a data-movement kernel (a permute) just wrote is where that
        # kernel writes it anyway. Tracing puts one there only when the permuted tensor is not
        # contiguous in host memory (meta SDPA outputs are, CPU ones are not), so absorbing it
        # keeps a meta compile and a real-weight compile of one model the same program.
        return True
    prologue = op.kind in PROLOGUE_TARGETS and all(o.kind in EPILOGUE_KINDS for o in group)
    if op.kind not in EPILOGUE_KINDS and not prologue:
        return False
    inside = {o.name for o in group}
    if op.target == GETITEM and op.refs[0] in inside:
        return True  # results of a multi-output op are unpacked where it runs
    # Values made inside that others also read become extra outputs of the kernel.
    return bool(inside.intersection(op.refs))


def kernel_label(group: list[Op]) -> str:
    labels = [o.label for o in group if o.kind != "alias"] or [group[0].label]
    return "+".join(dict.fromkeys(labels))


# A fused kernel is timed by its heaviest op class.
_KIND_PRIORITY = ("collective", "attention", "gemm", "conv", "norm", "softmax", "reduction", "pool", "gather",
                  "data", "elementwise", "alias")


def kernel_kind(group: list[Op]) -> str:
    kinds = {o.kind for o in group}
    return next((k for k in _KIND_PRIORITY if k in kinds), group[0].kind)

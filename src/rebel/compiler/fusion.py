"""Fusion: group a device segment's ops into kernels.

A kernel starts at an anchor (GEMM, conv, reduction, data movement...) and absorbs the
element-wise ops that follow it when the intermediate result is used by nothing else, so it never
leaves SRAM and is rounded only once, at the kernel's output (linear+bias+relu is one kernel).
Views (alias ops) are free and join whatever kernel is open.
"""
from __future__ import annotations

from ..ir import GETITEM, Op

EPILOGUE_KINDS = ("elementwise", "alias")


def fuse(ops: list[Op], users: dict[str, list[str]]) -> list[list[Op]]:
    groups: list[list[Op]] = []
    for op in ops:
        group = groups[-1] if groups else None
        if group is not None and (_only_alias(group) or _can_absorb(group, op, users)):
            group.append(op)
        else:
            groups.append([op])
    return groups


def _only_alias(group: list[Op]) -> bool:
    return all(o.kind == "alias" for o in group)


def _can_absorb(group: list[Op], op: Op, users: dict[str, list[str]]) -> bool:
    if op.kind not in EPILOGUE_KINDS:
        return False
    inside = {o.name for o in group}
    if op.target == GETITEM and op.refs[0] in inside:
        return True  # results of a multi-output op are unpacked where it runs
    if not inside.intersection(op.refs):
        return False
    # Every value made inside the group must stay inside once `op` joins.
    allowed = inside | {op.name}
    return all(set(users.get(name, ())) <= allowed for name in inside)


def kernel_label(group: list[Op]) -> str:
    labels = [o.label for o in group if o.kind != "alias"] or [group[0].label]
    return "+".join(dict.fromkeys(labels))


def kernel_kind(group: list[Op]) -> str:
    return next((o.kind for o in group if o.kind != "alias"), "alias")

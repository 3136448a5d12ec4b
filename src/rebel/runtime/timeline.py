"""Turn a compiled program into the device's work list and predict its timeline.

Shapes are static, so one run of a program mostly takes the same predicted time: the timeline is
computed once per runtime and replayed (shifted on the clock) for every run. The exception is
paged attention, whose work follows the context each sequence has reached: for those programs
the runtime scales the attention kernels by the run's positions (`paged_fill`) and re-times,
once per distinct fill (`TimelineCache`).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

import torch

from ..compiler.program import Program
from ..compiler.schedule import paged_operands
from ..device.engine import DeviceStep, EventEngine, HostOpStep, HostStep, KernelStep, Timeline
from ..device.timing import KernelPlan, host_op_seconds, kernel_time
from ..errors import DeviceError
from ..npu.spec import ProductSpec
from .report import RunReport

HOST_FLOPS_PER_ELEMENT = 8.0  # fallback ops are transcendental-heavy (atan, erfinv...)


def build_steps(program: Program, spec: ProductSpec, fill: dict[str, float] | None = None) -> list:
    """fill: per paged-attention kernel, the share of its compiled (maximum) context in use."""
    steps = []
    caches = set(program.mutable_buffers)
    for seg in program.segments:
        if seg.kind == "device":
            plans = [(k, _scaled(k.plan, fill[k.name], caches) if fill and k.name in fill else k.plan)
                     for k in seg.kernels]
            kernels = tuple(step for k, plan in plans
                            for step in _kernel_steps(k, plan, spec, program.device_dtype))
            steps.append(DeviceStep(
                seg.name, tuple((v, program.values[v].nbytes()) for v in seg.copy_in), kernels,
                tuple((v, program.values[v].nbytes()) for v in seg.copy_out)))
        else:
            ops = []
            for op in seg.ops:
                if op.kind == "alias" or op.target == "getitem":
                    continue
                out = sum(s.numel for s in op.out_specs)
                nbytes = sum(s.nbytes() for s in op.out_specs) + sum(
                    program.values[r].nbytes() for r in op.refs if r in program.values)
                ops.append(HostOpStep(op.label, host_op_seconds(out * HOST_FLOPS_PER_ELEMENT, nbytes, spec),
                                      {"op": op.target, "reason": op.host_reason}))
            steps.append(HostStep(seg.name, tuple(ops)))
    return steps


def _kernel_steps(k, plan: KernelPlan, spec: ProductSpec, dtype: str) -> list[KernelStep]:
    """The kernel launches of one program kernel: itself, or the parts its plan lists (a
    library op that launches several kernels, each timed as its own launch)."""
    targets = tuple(o.target for o in k.ops)
    if not plan.launches:
        return []
    if not plan.parts:
        return [KernelStep(k.name, k.kind, targets, plan, kernel_time(plan, spec, dtype, k.kind))]
    return [KernelStep(f"{k.name}.{p.label}", p.kind, targets, p.plan,
                       kernel_time(p.plan, spec, p.dtype, p.kind)) for p in plan.parts]


@dataclass(frozen=True)
class PagedSite:
    """A paged-attention kernel and where its run-time context comes from."""

    kernel: str
    positions: str      # the input holding each query token's position
    rows: int           # sequences in the graph
    blocks: int         # KV blocks (ours: attention partitions) compiled per sequence
    block: int          # tokens per block (ours: per partition)
    span: int = 0       # vendor ops: positions holds each row's first new token, then `span`


def paged_sites(program: Program) -> list[PagedSite]:
    """Found once per program, so runs without paged attention pay nothing."""
    inputs = {name for name, _ in program.inputs}
    sites = []
    for k in program.kernels:
        for op in k.ops:
            p = paged_operands(op)
            if p is None or p["positions"] not in inputs:
                continue
            table = program.values[p["tables"]].shape
            q = program.values[p["q"]].shape
            rows, blocks = (q[0], table[0]) if len(table) == 1 else (table[0], table[-1])
            vendor = p.get("vendor")
            if vendor is not None and vendor.family == "sliding":
                continue  # a fixed window: timed as compiled
            if vendor is None:  # ours reads the cache partition by partition, whatever its blocks
                blocks = blocks * program.values[p["kcache"]].shape[2] // p["block"]
            sites.append(PagedSite(k.name, p["positions"], rows, blocks, p["block"],
                                   q[-2] if vendor is not None else 0))
    return sites


def paged_fill(sites: list[PagedSite], values: dict) -> dict[str, float]:
    """For each paged-attention kernel: blocks its sequences have reached / blocks compiled for,
    from the positions the run was given (a position < 0 is padding)."""
    shares: dict[tuple, float] = {}  # every layer reads the same positions: one sync for all
    fill = {}
    for site in sites:
        shape = (site.positions, site.rows, site.blocks, site.block, site.span)
        if shape not in shares:
            positions = torch.as_tensor(values[site.positions]).long()
            positions = positions.reshape(site.rows, -1) if positions.numel() >= site.rows \
                else positions.reshape(1, -1).expand(site.rows, -1)
            reached = (positions.max(dim=-1).values + (site.span if site.span else 1)).clamp(min=0)
            used = (-(-reached // site.block)).clamp(max=site.blocks).sum().item()
            shares[shape] = max(used, 1) / (site.rows * site.blocks)
        fill[site.kernel] = shares[shape]
    return fill


class TimelineCache:
    """The timelines of one program's runs, memoised by exactly the state their timing reads:
    the paged-attention fill of each kernel (from the blocks the run's positions reached) and
    the inputs passed pinned. Decode steps at the same context then cost a dictionary look-up
    instead of a re-timing of every kernel, and the run report drawn from the timeline's events
    is built once per entry too. Bounded (least recently used goes first) because every context
    length a server reaches is a new key."""

    def __init__(self, size: int = 256):
        self.size = size
        self._entries: OrderedDict = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(fill: dict[str, float] | None, pinned: frozenset[str]) -> tuple:
        return (tuple(sorted(fill.items())) if fill else (), frozenset(pinned))

    def get(self, engine: EventEngine, program: Program, spec: ProductSpec,
            fill: dict[str, float] | None = None, pinned: frozenset[str] = frozenset(),
            device: int = 0) -> tuple[Timeline, RunReport]:
        """The timeline `engine` predicts for `program` run with `fill` and `pinned`, and its
        report (wall_time_s 0: the caller sets the run's own). The engine's settings (device,
        prefetch, group, link) are fixed per runtime, which owns one cache per bucket, so they
        are not part of the key."""
        key = self.key(fill, pinned)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry
        self.misses += 1
        timeline = engine.run(build_steps(program, spec, fill), pinned=pinned)
        entry = (timeline, RunReport.from_events(program.npu, device, timeline.events, 0.0))
        self._entries[key] = entry
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return entry

    def __len__(self) -> int:
        return len(self._entries)


def _scaled(plan: KernelPlan, fill: float, caches: set[str]) -> KernelPlan:
    gemm = replace(plan.gemm, work_fraction=plan.gemm.work_fraction * fill) if plan.gemm else None
    dma_in = tuple(replace(t, nbytes=int(t.nbytes * fill)) if t.value in caches else t
                   for t in plan.dma_in)
    return replace(plan, flops=plan.flops * fill, gemm=gemm, dma_in=dma_in)


def die_group(program: Program, spec: ProductSpec, device=0):
    """The dies a run of `program` from `device` uses and the link their collectives take: the
    dies given (a sequence, one per tensor-parallel rank), or as many consecutive dies from one
    index as it was compiled for (as `Runtime` places it); over the card's die-to-die link when
    they share a card, else the card-to-card link. Devices are numbered card by card,
    `spec.dies` to a card, as the machine shows them."""
    if isinstance(device, (list, tuple)):
        group = tuple(device)
        if len(group) != program.tensor_parallel_size or len(set(group)) != len(group):
            raise DeviceError(f"the model was compiled for tensor_parallel_size="
                              f"{program.tensor_parallel_size}; give that many distinct devices, "
                              f"got {list(group)}")
    else:
        group = tuple(range(device, device + program.tensor_parallel_size))
    return group, group_link(group, spec)


def group_link(group, spec: ProductSpec):
    """The link a group of dies' collectives take: the card's own when all share one card."""
    one_card = len({d // spec.dies for d in group}) == 1
    return spec.links.die_to_die if one_card else spec.links.card_to_card


def predict(program: Program, spec: ProductSpec, device=0, prefetch: bool = True) -> Timeline:
    """Predicted timeline of one run, tensor-parallel collectives included (without the group a
    sharded program's collectives would cost nothing). device: a first index or every die."""
    group, link = die_group(program, spec, device)
    return EventEngine(spec, group[0], prefetch, group=group, link=link).run(build_steps(program, spec))

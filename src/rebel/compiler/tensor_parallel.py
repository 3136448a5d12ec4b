"""Tensor parallelism: shard a graph over N dies, Megatron style, by propagating shardings.

Every value is replicated, split along one dim, or partial (each die holds a partial sum). A
linear layer whose input is replicated becomes column parallel (its weight split by output
features, its output split along the last dim); one whose input is split along its contraction
dim becomes row parallel (weight split by input features, output partial). Element-wise ops,
views, permutes, norms over other dims and attention over split heads keep a split; anything that
cannot is given replicated inputs by inserting a collective (all-gather of a split value,
all-reduce of a partial one). Values that leave the device, or that an op cannot take split,
are made replicated first. The program each die runs is the same; collectives are their own
kernels, timed on the chip-to-chip link.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import CompileError
from ..ir import GETITEM, Graph, Op, Ref, TensorSpec, substitute
from .support import classify

ALL_REDUCE = "rbln.all_reduce.default"
ALL_GATHER = "rbln.all_gather.default"
SHARD = "rbln.shard.default"
COLLECTIVES = (ALL_REDUCE, ALL_GATHER, SHARD)
PARTIAL = "partial"


@dataclass
class Sharding:
    """Result of the pass: how each value and weight is laid out over the dies."""

    size: int
    values: dict[str, int | str] = field(default_factory=dict)  # name -> split dim or PARTIAL
    weights: dict[str, int] = field(default_factory=dict)        # weight -> split dim

    def local_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        dim = self.values.get(name, self.weights.get(name))
        if not isinstance(dim, int):
            return shape
        return tuple(s // self.size if i == dim else s for i, s in enumerate(shape))

    def to_json(self) -> dict:
        return {"size": self.size, "values": self.values, "weights": self.weights}

    @staticmethod
    def from_json(d: dict | None) -> Sharding:
        if not d:
            return Sharding(1)
        return Sharding(int(d["size"]), dict(d["values"]), dict(d["weights"]))


def shard_graph(graph: Graph, size: int) -> Sharding:
    if size < 1:
        raise CompileError(f"tensor_parallel_size must be at least 1, got {size}")
    sharding = Sharding(size)
    if size == 1:
        return sharding
    _Pass(graph, sharding).run()
    return sharding


class _Pass:
    def __init__(self, graph: Graph, sharding: Sharding):
        self.g = graph
        self.s = sharding
        self.n = sharding.size
        self.specs = graph.specs()
        self.ops: list[Op] = []
        self.replicas: dict[tuple[str, str], str] = {}  # (value, how) -> collective output
        self.used: set[str] = set()  # weights some emitted op reads

    # --- helpers --------------------------------------------------------------------------------

    def state(self, name: str):
        if name in self.g.weights:
            return self.s.weights.get(name)
        return self.s.values.get(name)

    def spec(self, name: str) -> TensorSpec | None:
        return self.specs.get(name)

    def emit(self, op: Op, state=None) -> None:
        for r in op.refs:
            if r in self.g.weights and r not in self.s.weights:
                # read whole: a later split use must take a copy
                self.used.add(r)
        self.ops.append(op)
        if state is not None:
            self.s.values[op.name] = state
        if isinstance(op.out, TensorSpec):
            self.specs[op.name] = op.out

    def collective(self, target: str, value: str, *extra) -> str:
        key = (value, target + str(extra))
        if key not in self.replicas:
            name = f"{value}_{target.split('.')[1]}"
            state = extra[0] if target == SHARD else None
            self.emit(Op(name, target, (Ref(value), *extra), {}, self.spec(value),
                         label=target.split(".")[1], kind="collective"), state)
            self.replicas[key] = name
        return self.replicas[key]

    def replicated(self, value: str) -> str:
        """The name of a replicated copy of `value` (inserting a collective if needed)."""
        st = self.state(value)
        if st is None:
            return value
        if st == PARTIAL:
            return self.collective(ALL_REDUCE, value)
        if value in self.g.weights:
            return self._weight_copy(value, None)
        return self.collective(ALL_GATHER, value, st)

    def split_copy(self, value: str, dim: int) -> str:
        """A copy of replicated `value` split along `dim` (a local slice, no communication)."""
        st = self.state(value)
        if st == dim:
            return value
        if st is not None:
            value = self.replicated(value)
        if value in self.g.weights and value not in self.g.mutable_buffers:
            return self._weight_copy(value, dim)
        return self.collective(SHARD, value, dim)

    def rewrite(self, op: Op, mapping: dict[str, str]) -> Op:
        refs = {r: Ref(mapping.get(r, r)) for r in op.refs}
        op.args, op.kwargs = substitute(op.args, refs), substitute(op.kwargs, refs)
        return op

    def all_replicated(self, op: Op) -> None:
        mapping = {r: self.replicated(r) for r in op.refs}
        self.emit(self.rewrite(op, mapping), None)

    def local_sizes(self, op: Op, dim: int) -> None:
        """Ops with explicit sizes (view, expand) get the local size along the split dim."""
        out = op.out
        if isinstance(out, TensorSpec) and len(op.args) > 1 and isinstance(op.args[1], (list, tuple)):
            shape = list(out.shape)
            shape[dim] //= self.n
            op.args = (op.args[0], shape, *op.args[2:])

    # --- the pass -------------------------------------------------------------------------------

    def run(self) -> None:
        for op in self.g.ops:
            self.visit(op)
        outputs = []
        for o in self.g.outputs:
            outputs.append(Ref(self.replicated(o.name)) if isinstance(o, Ref) else o)
        self.g.outputs = outputs
        updates = {}
        for value, buffer in self.g.buffer_updates.items():
            split = self.s.weights.get(buffer)
            # a buffer split over the dies (a KV cache by heads) takes each die's slice as is
            updates[value if split is not None and self.state(value) == split
                    else self.replicated(value)] = buffer
        self.g.buffer_updates = updates
        self.g.ops = self.ops

    def visit(self, op: Op) -> None:
        name = op.target.split(".")[1] if "." in op.target else op.target
        cls = classify(op.target)
        kind = cls.kind if cls else ("alias" if op.target == GETITEM else "host")
        states = {r: self.state(r) for r in op.refs}
        if not any(st is not None for st in states.values()) and name not in ("mm", "addmm", "linear", "linear_weight_only", "moe_gate_up"):
            self.emit(op, None)
            return
        handler = {"mm": self.linear, "addmm": self.linear, "linear": self.linear, "scaled_dot_product_attention": self.attention,
                   "view": self.view, "_unsafe_view": self.view, "reshape": self.view,
                   "permute": self.permute, "transpose": self.transpose, "unsqueeze": self.unsqueeze,
                   "expand": self.expand, "cat": self.cat, "bmm": self.batched,
                   "slice": self.slice_like, "select": self.slice_like,
                   "paged_attention": self.paged_attention,
                   "linear_weight_only": self._linear_weight_only,
                   "moe_gate_up": self._moe_gate_up, "moe_down": self._moe_down,
                   # its args are (x, k, dim), not a reduction's dims: keep it whole
                   "topk": self.all_replicated}.get(name)
        if handler is not None:
            handler(op)
        elif op.target == GETITEM:
            # results of a multi-output op (norm: out, mean, rstd) share its layout
            self.emit(op, self.state(op.refs[0]))
        elif kind == "elementwise" or name in ("clone", "alias", "detach"):
            self.elementwise(op)
        elif kind in ("norm", "softmax", "reduction"):
            self.reduction(op, name)
        else:
            self.all_replicated(op)

    def linear(self, op: Op) -> None:
        """mm(x, W[K, N]), addmm(bias, x, W[K, N]) or linear(x, W[N, K], bias)."""
        name = op.target.split(".")[1]
        if name == "linear":
            return self._linear_whole(op)
        bias, x, w = (None, *op.args) if name == "mm" else op.args
        x_name, w_name = x.name, getattr(w, "name", None)
        if w_name not in self.g.weights or self.spec(w_name) is None:
            return self.all_replicated(op)
        k, n = self.spec(w_name).shape
        st = self.state(x_name)
        if st is not None and st != PARTIAL and st == len(self.spec(x_name).shape) - 1 and k % self.n == 0:
            # Row parallel: each die holds K/N rows of W and adds a partial product.
            w_local = self._weight_copy(w_name, 0)
            args = (Ref(x_name), Ref(w_local))
            if bias is not None:
                args = (Ref(self._scaled_bias(bias.name)), *args)
            op.args = args
            self.emit(op, PARTIAL)
            return
        if n % self.n != 0:
            return self.all_replicated(op)
        # Column parallel: each die computes N/n output features.
        x_rep = self.replicated(x_name)
        w_local = self._weight_copy(w_name, 1)
        args = (Ref(x_rep), Ref(w_local))
        if bias is not None:
            args = (Ref(self.split_copy(bias.name, 0)), *args)
        op.args = args
        self.emit(op, len(op.out.shape) - 1)

    def _linear_whole(self, op: Op) -> None:
        """aten.linear(x, weight [N, K], bias): the weight split by rows (column parallel, each
        die makes N/n outputs) or by columns (row parallel, partial sums) as x arrives."""
        x, w = op.args[0], op.args[1]
        bias = op.args[2] if len(op.args) > 2 else op.kwargs.get("bias")
        w_name = getattr(w, "name", None)
        if (not isinstance(x, Ref) or w_name not in self.g.weights or self.spec(w_name) is None
                or len(self.spec(w_name).shape) != 2 or op.kwargs):
            return self.all_replicated(op)
        n, k = self.spec(w_name).shape
        st = self.state(x.name)
        if st is not None and st != PARTIAL and st == len(self.spec(x.name).shape) - 1 and k % self.n == 0:
            args = [Ref(x.name), Ref(self._weight_copy(w_name, 1))]
            if isinstance(bias, Ref):
                args.append(Ref(self._scaled_bias(bias.name)))
            op.args = tuple(args)
            self.emit(op, PARTIAL)
            return
        if n % self.n != 0:
            return self.all_replicated(op)
        args = [Ref(self.replicated(x.name)), Ref(self._weight_copy(w_name, 0))]
        if isinstance(bias, Ref):
            args.append(Ref(self.split_copy(bias.name, 0)))
        op.args = tuple(args)
        self.emit(op, len(op.out.shape) - 1)

    def _linear_weight_only(self, op: Op) -> None:
        """rbln::linear_weight_only(x, qweight [N, K or K/2], scales [N, G], bits, group_size,
        bias): split like aten.linear. Row parallel splits the packed columns and, with them,
        the scale groups (or keeps a per-channel scale whole: it covers every slice); a die
        derives its group size from the shapes it holds. Groups that a split would cut
        (G not a multiple of the dies) make it column parallel."""
        x, qweight, scales = op.args[:3]
        bias = op.args[5] if len(op.args) > 5 else op.kwargs.get("bias")
        names = [getattr(a, "name", None) for a in (qweight, scales)]
        if not isinstance(x, Ref) or any(n not in self.g.weights or self.spec(n) is None
                                         for n in names):
            return self.all_replicated(op)
        (n, packed), groups = self.spec(names[0]).shape, self.spec(names[1]).shape[1]
        st = self.state(x.name)
        rest = list(op.args[3:5])
        if st is not None and st != PARTIAL and st == len(self.spec(x.name).shape) - 1 \
                and packed % self.n == 0 and (groups % self.n == 0 or groups == 1):
            args = [Ref(x.name), Ref(self._weight_copy(names[0], 1)),
                    Ref(self._weight_copy(names[1], 1 if groups > 1 else None)), *rest]
            if isinstance(bias, Ref):
                args.append(Ref(self._scaled_bias(bias.name)))
            op.args, op.kwargs = tuple(args), {}
            self.emit(op, PARTIAL)
            return
        if n % self.n != 0:
            return self.all_replicated(op)
        args = [Ref(self.replicated(x.name)), Ref(self._weight_copy(names[0], 0)),
                Ref(self._weight_copy(names[1], 0)), *rest]
        if isinstance(bias, Ref):
            args.append(Ref(self.split_copy(bias.name, 0)))
        op.args, op.kwargs = tuple(args), {}
        self.emit(op, len(op.out.shape) - 1)

    def _moe_gate_up(self, op: Op) -> None:
        """rbln::moe_gate_up(x, ids, gate [E, I, H], up [E, I, H], act): column parallel
        over the experts' intermediate dim, every expert on every die (each die holds I/n of
        each expert's gate and up rows, the same rows of both, so act(gate) * up stays local);
        the result [T, k, I] split along I."""
        x, ids, gate, up = op.args[:4]
        names = [getattr(w, "name", None) for w in (gate, up)]
        if (not isinstance(x, Ref) or not isinstance(ids, Ref) or op.kwargs
                or any(n not in self.g.weights or self.spec(n) is None for n in names)
                or self.spec(names[0]).shape[1] % self.n):
            return self.all_replicated(op)
        op.args = (Ref(self.replicated(x.name)), Ref(self.replicated(ids.name)),
                   *(Ref(self._weight_copy(n, 1)) for n in names), *op.args[4:])
        self.emit(op, 2)

    def _moe_down(self, op: Op) -> None:
        """rbln::moe_down(h [T, k, I], ids, weights, down [E, H, I]): row parallel when h
        arrives split along I (each die's I/n columns of every expert's down weight), giving
        a partial [T, H] that one all-reduce completes, as after a dense MLP's down proj."""
        h, ids, weights, down = op.args[:4]
        name = getattr(down, "name", None)
        if (not isinstance(h, Ref) or self.state(h.name) != 2 or op.kwargs
                or name not in self.g.weights or self.spec(name) is None
                or self.spec(name).shape[2] % self.n):
            return self.all_replicated(op)
        op.args = (Ref(h.name), *(Ref(self.replicated(a.name)) for a in (ids, weights)),
                   Ref(self._weight_copy(name, 2)))
        self.emit(op, PARTIAL)

    def _weight_copy(self, name: str, dim: int | None) -> str:
        """Weight `name` split along `dim` (None: whole). A weight used both ways gets a copy
        per layout, since each die's DRAM holds only its own slice of a split weight."""
        current = self.s.weights.get(name)
        if current == dim:
            return name
        used = name in self.used
        if current is None and (dim is None or not used):
            if dim is not None:
                self.s.weights[name] = dim
            self.used.add(name)
            return name
        copy = f"{name}@{'full' if dim is None else f'split{dim}'}"
        if copy not in self.g.weights:
            self.g.weights[copy] = self.g.weights[name]
            self.specs[copy] = self.specs[name]
            if dim is not None:
                self.s.weights[copy] = dim
        self.used.add(copy)
        return copy

    def _scaled_bias(self, name: str) -> str:
        """Row-parallel bias: every die adds bias/N, so the all-reduce adds it exactly once."""
        scaled = f"{name}@div{self.n}"
        if scaled not in self.g.weights:
            self.g.weights[scaled] = self.g.weights[self.replicated(name)] / self.n
            self.specs[scaled] = self.specs[name]
        return scaled

    def elementwise(self, op: Op) -> None:
        out = op.out
        if not isinstance(out, TensorSpec):
            return self.all_replicated(op)
        rank = len(out.shape)
        refs = [r for r in dict.fromkeys(op.refs)]
        for r in refs:
            if self.state(r) == PARTIAL:
                return self.all_replicated(op)
        dims = {rank - len(self.spec(r).shape) + self.state(r) for r in refs
                if isinstance(self.state(r), int) and self.spec(r) is not None}
        if len(dims) != 1:
            return self.all_replicated(op)
        d = dims.pop()
        mapping = {}
        for r in refs:
            spec = self.spec(r)
            local_dim = d - (rank - len(spec.shape)) if spec is not None else -1
            if spec is None or local_dim < 0 or spec.shape[local_dim] == 1:
                continue  # broadcasts along the split dim: every die uses it whole
            if spec.shape[local_dim] != out.shape[d]:
                return self.all_replicated(op)
            mapping[r] = self.split_copy(r, local_dim)
        self.emit(self.rewrite(op, mapping), d)

    def reduction(self, op: Op, name: str) -> None:
        x = op.refs[0]
        st = self.state(x)
        spec = self.spec(x)
        if st == PARTIAL or not isinstance(st, int) or spec is None:
            return self.all_replicated(op)
        rank = len(spec.shape)
        if name in ("native_layer_norm", "native_group_norm"):
            reduced = set(range(rank - len(op.args[1]), rank)) if name == "native_layer_norm" else {1}
        elif name in ("_softmax", "_log_softmax"):
            reduced = {op.args[1] % rank}
        else:
            dims = op.args[1] if len(op.args) > 1 else None
            dims = [dims] if isinstance(dims, int) else dims
            reduced = set(range(rank)) if not dims else {d % rank for d in dims}
        if st in reduced or any(r != x and self.state(r) is not None for r in op.refs):
            return self.all_replicated(op)
        keepdim = name in ("native_layer_norm", "_softmax", "_log_softmax", "native_group_norm") or (
            len(op.args) > 2 and op.args[2] is True) or op.kwargs.get("keepdim", False)
        out_dim = st if keepdim else st - sum(1 for r in reduced if r < st)
        self.emit(op, out_dim)

    def attention(self, op: Op) -> None:
        q, k, v = (a.name for a in op.args[:3])
        heads = len(self.spec(q).shape) - 3
        if heads < 0:
            return self.all_replicated(op)
        qh, kvh = self.spec(q).shape[heads], self.spec(k).shape[heads]
        mask = op.args[3] if len(op.args) > 3 else op.kwargs.get("attn_mask")
        if qh % self.n or kvh % self.n or (isinstance(mask, Ref) and self.state(mask.name) is not None):
            return self.all_replicated(op)
        mapping = {name: self.split_copy(name, heads) for name in (q, k, v)}
        self.emit(self.rewrite(op, mapping), heads)

    def paged_attention(self, op: Op) -> None:
        """Split by heads: each die keeps the KV-cache slice of its own KV heads for good."""
        q, k, v, k_cache, v_cache = (a.name for a in op.args[:5])
        heads, kv_heads = self.spec(q).shape[1], self.spec(k_cache).shape[1]
        tables, positions = op.args[5].name, op.args[6].name
        if heads % self.n or kv_heads % self.n or self.state(tables) is not None \
                or self.state(positions) is not None:
            return self.all_replicated(op)
        mapping = {name: self.split_copy(name, 1) for name in (q, k, v)}
        for cache in (k_cache, v_cache):
            if self.s.weights.get(cache, 1) != 1 or cache in self.used:
                return self.all_replicated(op)
            self.s.weights[cache] = 1
        self.emit(self.rewrite(op, mapping), 1)

    def batched(self, op: Op) -> None:
        a, b = op.refs[:2]
        if self.state(a) == 0 and self.state(b) == 0:
            return self.emit(op, 0)
        self.all_replicated(op)

    def view(self, op: Op) -> None:
        x = op.refs[0]
        st, src, out = self.state(x), self.spec(x), op.out
        if st == PARTIAL:
            return self.emit(op, PARTIAL)  # sums commute with reshapes
        d = _map_reshape(src.shape, out.shape, st, self.n)
        if d is None:
            return self.all_replicated(op)
        self.local_sizes(op, d)
        self.emit(op, d)

    def permute(self, op: Op) -> None:
        st = self.state(op.refs[0])
        if not isinstance(st, int):
            return self.emit(op, st)
        perm = [p % len(op.out.shape) for p in op.args[1]]
        self.emit(op, perm.index(st))

    def transpose(self, op: Op) -> None:
        st = self.state(op.refs[0])
        if not isinstance(st, int):
            return self.emit(op, st)
        rank = len(op.out.shape)
        a, b = op.args[1] % rank, op.args[2] % rank
        self.emit(op, b if st == a else a if st == b else st)

    def unsqueeze(self, op: Op) -> None:
        st = self.state(op.refs[0])
        if not isinstance(st, int):
            return self.emit(op, st)
        d = op.args[1] % len(op.out.shape)
        self.emit(op, st + 1 if d <= st else st)

    def expand(self, op: Op) -> None:
        st = self.state(op.refs[0])
        if not isinstance(st, int):
            return self.all_replicated(op)
        d = st + len(op.out.shape) - len(self.spec(op.refs[0]).shape)
        self.local_sizes(op, d)
        self.emit(op, d)

    def cat(self, op: Op) -> None:
        tensors = [r.name for r in op.args[0]]
        rank = len(op.out.shape)
        dim = (op.args[1] if len(op.args) > 1 else 0) % rank
        dims = {self.state(t) for t in tensors} - {None}
        if len(dims) != 1 or PARTIAL in dims or dim in dims:
            return self.all_replicated(op)
        d = dims.pop()
        op.args = ([Ref(self.split_copy(t, d)) for t in tensors], *op.args[1:])
        self.emit(op, d)

    def slice_like(self, op: Op) -> None:
        st = self.state(op.refs[0])
        rank_in = len(self.spec(op.refs[0]).shape)
        dim = (op.args[1] if len(op.args) > 1 else 0) % rank_in
        if not isinstance(st, int) or st == dim:
            return self.all_replicated(op)
        select = op.target.startswith("aten.select")
        self.emit(op, st - 1 if select and st > dim else st)


def _map_reshape(src: tuple, dst: tuple, dim: int | None, n: int) -> int | None:
    """Where a split along `dim` of `src` lands in `dst`. A split is a contiguous block of each
    row of the dims before it, so it survives any reshape that keeps those leading dims' product
    and starts a dst dim there that n divides ([B,S,H*D] -> [B,S,H,D]: H*D lands on H)."""
    if dim is None:
        return None
    before = math.prod(src[:dim])
    acc = 1
    for i, size in enumerate(dst):
        if acc == before and size > 1 and size % n == 0:
            return i
        acc *= size
        if acc > before:
            return None
    return None


def shard_weight(t: torch.Tensor, dim: int | None, rank: int, size: int) -> torch.Tensor:
    if dim is None or size == 1:
        return t
    return t.chunk(size, dim)[rank].contiguous()

"""The compiled program: what the runtime executes, in a form that round-trips through JSON.

A program is a sequence of segments. A device segment lists the tensors the host copies in
(External HDMA), its kernels in order (each with its ops and its timing plan) and the tensors
copied back out. A host segment lists the ops that fall back to the host CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..device.timing import KernelPlan
from ..errors import ArtifactError
from ..ir import Op, TensorSpec, decode, encode
from .tensor_parallel import Sharding

PROGRAM_VERSION = 1


@dataclass
class Kernel:
    name: str                # "<index>_<label>", e.g. "1_linear+relu"
    kind: str                # dominant op class (gemm, elementwise, ...) or "cast"
    ops: list[Op]
    outputs: list[str]       # values this kernel makes visible to later kernels or the host
    plan: KernelPlan = field(default_factory=KernelPlan)

    @property
    def labels(self) -> list[str]:
        return self.name.split("_", 1)[1].split("+")

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "ops": [o.to_json() for o in self.ops],
                "outputs": self.outputs, "plan": self.plan.to_json()}

    @staticmethod
    def from_json(d: dict) -> Kernel:
        return Kernel(d["name"], d["kind"], [Op.from_json(o) for o in d["ops"]], list(d["outputs"]),
                      KernelPlan.from_json(d["plan"]))


@dataclass
class Segment:
    kind: str                                       # "device" or "host"
    name: str
    copy_in: list[str] = field(default_factory=list)    # values copied host -> device first
    copy_out: list[str] = field(default_factory=list)   # values copied device -> host at the end
    kernels: list[Kernel] = field(default_factory=list)  # device segments
    ops: list[Op] = field(default_factory=list)          # host segments

    def to_json(self) -> dict:
        return {"kind": self.kind, "name": self.name, "copy_in": self.copy_in,
                "copy_out": self.copy_out, "kernels": [k.to_json() for k in self.kernels],
                "ops": [o.to_json() for o in self.ops]}

    @staticmethod
    def from_json(d: dict) -> Segment:
        if d.get("kind") not in ("device", "host"):
            raise ArtifactError(f"unknown segment kind {d.get('kind')!r}")
        return Segment(d["kind"], d["name"], list(d["copy_in"]), list(d["copy_out"]),
                       [Kernel.from_json(k) for k in d["kernels"]], [Op.from_json(o) for o in d["ops"]])


@dataclass
class Program:
    npu: str
    device_dtype: str
    inputs: list[tuple[str, TensorSpec]]
    outputs: list                       # Ref or literal per flat output
    out_spec: str                       # pytree TreeSpec JSON
    values: dict[str, TensorSpec]       # logical (graph) spec of every tensor value
    weights: dict[str, TensorSpec]      # as stored in device DRAM (floats in the device dtype)
    segments: list[Segment]
    buffer_updates: dict[str, str] = field(default_factory=dict)  # value -> persistent buffer
    mutable_buffers: list[str] = field(default_factory=list)
    sharding: Sharding = field(default_factory=lambda: Sharding(1))  # tensor parallelism
    # The caller's names for the inputs (from compile_from_torch's input_info), by position; the
    # graph's own names stay in `inputs` because the kernels refer to values by those.
    input_names: list[str] | None = None
    # Return a flat tensor (one output) or list (several) instead of the module's pytree: the
    # vendor's calling convention, used when the model was compiled with input_info.
    flat_outputs: bool = False
    # Static-address buffers (inputs a compile context marked static), by name -> the full shape
    # the runtime allocates (the compiled shape unless exp_multiply/rescale_buffer_size resized
    # it, e.g. a paged KV cache grown to the blocks device DRAM fits). They are also in
    # `weights` (their device spec as compiled) and `mutable_buffers`, so the kernels and the
    # scheduler see a DRAM-resident persistent buffer; their storage is the context's.
    static_buffers: dict[str, list[int]] = field(default_factory=dict)

    @property
    def tensor_parallel_size(self) -> int:
        return self.sharding.size

    @property
    def kernels(self) -> list[Kernel]:
        return [k for s in self.segments for k in s.kernels]

    @property
    def host_ops(self) -> list[Op]:
        return [o for s in self.segments if s.kind == "host" for o in s.ops]

    @property
    def weight_bytes(self) -> int:
        """Weight bytes one die holds (its slices of split weights, all of the others); static
        buffers are not weights (see static_bytes)."""
        return sum(TensorSpec(self.sharding.local_shape(n, s.shape), s.dtype).nbytes()
                   for n, s in self.weights.items() if n not in self.static_buffers)

    def static_buffer_spec(self, name: str) -> TensorSpec:
        """A static buffer's spec as allocated (resized shape, device dtype), whole."""
        return TensorSpec(tuple(self.static_buffers[name]), self.weights[name].dtype)

    def static_local_bytes(self, name: str) -> int:
        """Bytes one die holds of static buffer `name` at its allocated shape."""
        spec = self.static_buffer_spec(name)
        return TensorSpec(self.sharding.local_shape(name, spec.shape), spec.dtype).nbytes()

    @property
    def static_bytes(self) -> int:
        """Static-buffer bytes one die holds (shared by the context's runtimes)."""
        return sum(self.static_local_bytes(n) for n in self.static_buffers)

    def to_json(self) -> dict:
        return {
            "version": PROGRAM_VERSION, "npu": self.npu, "device_dtype": self.device_dtype,
            "inputs": [{"name": n, **s.to_json()} for n, s in self.inputs],
            "outputs": encode(self.outputs), "out_spec": self.out_spec,
            "values": {n: s.to_json() for n, s in self.values.items()},
            "weights": {n: s.to_json() for n, s in self.weights.items()},
            "segments": [s.to_json() for s in self.segments],
            "buffer_updates": self.buffer_updates, "mutable_buffers": self.mutable_buffers,
            "tensor_parallel": self.sharding.to_json(),
            "input_names": self.input_names, "flat_outputs": self.flat_outputs,
            "static_buffers": self.static_buffers,
        }

    @staticmethod
    def from_json(d: dict) -> Program:
        if d.get("version") != PROGRAM_VERSION:
            raise ArtifactError(f"program format version {d.get('version')!r} is not supported "
                                f"(this runtime reads version {PROGRAM_VERSION})")
        try:
            return Program(
                d["npu"], d["device_dtype"],
                [(i["name"], TensorSpec.from_json(i)) for i in d["inputs"]],
                decode(d["outputs"]), d["out_spec"],
                {n: TensorSpec.from_json(s) for n, s in d["values"].items()},
                {n: TensorSpec.from_json(s) for n, s in d["weights"].items()},
                [Segment.from_json(s) for s in d["segments"]],
                dict(d["buffer_updates"]), list(d["mutable_buffers"]),
                Sharding.from_json(d.get("tensor_parallel")),
                input_names=d.get("input_names"), flat_outputs=d.get("flat_outputs", False),
                static_buffers=d.get("static_buffers", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"program is malformed: {type(e).__name__}: {e}") from None

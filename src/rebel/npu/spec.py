"""Typed hardware descriptions loaded from TOML, so that no hardware number lives in code.

A spec file describes one product (a card): how many dies it has, what one die can do, and the
links around it. Keys carry their unit in the name (`_gbps`, `_us`, `_mib`); the properties below
convert to SI units (bytes, seconds, bytes/s, FLOP/s) so the timing model never converts units.
A file may start from a built-in product with `base = "NAME"` (or another spec file, a path
relative to the file) and override some keys.
"""
from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from ..errors import SpecError

SPEC_DIR = Path(__file__).parent / "specs"

MiB = 1024**2
GiB = 1024**3
GB = 1e9
US = 1e-6


@dataclass(frozen=True)
class ComputeSpec:
    neural_engines: int
    fp16_tflops: float
    bf16_tflops: float
    int8_tops: float
    int4_tops: float
    vector_tflops: float
    mac_array: tuple[int, int]
    matmul_efficiency: float
    kernel_launch_us: float
    attention_efficiency: float | None = None  # fused attention's fraction of peak (default: matmul's)
    # Convolutions keep NCHW tensors but the matrix units want channels last, so each one
    # transposes its input before and its output after (two more passes over memory, each
    # its own launch): cuDNN on tensor cores with PyTorch's default memory format.
    conv_layout_transposes: bool = False
    # ... and the filter too, on every call (compiler/eager_kernels.py)
    conv_filter_transposes: bool = False
    # Eval BatchNorm on half tensors with half weights runs three native kernels (copy of the
    # running mean, invstd, element-wise), not one cuDNN kernel (compiler/eager_kernels.py).
    batch_norm_native_eval: bool = False
    # Eager views: permute/transpose and eval dropout launch no kernel (compiler/eager_kernels.py)
    eager_views: bool = False
    # GEMM tiles stage their operands from the shared SRAM each K step (a GPU's L2 -> shared
    # memory): a tile's rate is capped by its arithmetic intensity times the engine's share of
    # the shared SRAM bandwidth (device/timing.py matrix_seconds).
    tile_operands_from_shared_sram: bool = False
    # Row reductions (softmax, layer/RMS norm) run as one thread block per row, the way
    # PyTorch's CUDA kernels do (SoftMax.cu, layer_norm_kernel.cu): the compiler then records
    # each such kernel's structure (threads per block, dependent passes over the row,
    # block-wide reductions) and the timing model follows it instead of a streaming rule.
    # The figures below describe the engine (an SM) those blocks are resident on; a spec
    # without them (an NPU) keeps the streaming rule.
    block_per_row_kernels: bool = False
    max_threads_per_engine: int | None = None   # resident threads per engine (SM)
    max_blocks_per_engine: int | None = None    # resident thread blocks per engine
    max_threads_per_block: int | None = None
    shared_mem_per_block_kib: float | None = None  # without the opt-in for more
    block_reduction_us: float | None = None     # one block-wide reduction (shuffles + barriers)
    # FP32 matrix rate without tensor cores (a GPU's SGEMM with TF32 off); None: no FP32 matmul.
    fp32_matmul_tflops: float | None = None
    # The fused attention kernels read the mask with unit stride along the keys and refuse any
    # other (PyTorch's sdp_utils.cpp for flash, memory-efficient and cuDNN attention); an
    # attention whose mask is broadcast along the keys (stride 0) then runs the math composite
    # (compiler/eager_attention.py), in FP32 when `math_attention_fp32` (PyTorch's default
    # `allow_fp16_bf16_reduction_math_sdp(False)`). Both off: attention is one fused kernel.
    attention_mask_unit_stride: bool = False
    math_attention_fp32: bool = False

    @property
    def row_kernels(self) -> bool:
        """Whether row reductions are timed as block-per-row kernels (all figures present)."""
        return self.block_per_row_kernels and None not in (
            self.max_threads_per_engine, self.max_blocks_per_engine, self.max_threads_per_block,
            self.shared_mem_per_block_kib, self.block_reduction_us)

    def peak_flops(self, dtype: str) -> float:
        """Matrix-unit peak in operations per second for a device dtype."""
        table = {"float16": self.fp16_tflops, "bfloat16": self.bf16_tflops,
                 "int8": self.int8_tops, "int4": self.int4_tops}
        if self.fp32_matmul_tflops is not None:
            table["float32"] = self.fp32_matmul_tflops
        if dtype not in table:
            raise SpecError(f"no matrix peak for device dtype {dtype!r}; known: {sorted(table)}")
        return table[dtype] * 1e12

    @property
    def attention_fraction(self) -> float:
        return self.attention_efficiency if self.attention_efficiency is not None else self.matmul_efficiency

    @property
    def vector_flops(self) -> float:
        return self.vector_tflops * 1e12

    @property
    def kernel_launch_s(self) -> float:
        return self.kernel_launch_us * US


@dataclass(frozen=True)
class MemorySpec:
    local_sram_mib: float
    shared_sram_mib: float
    dram_gib: float
    dram_reserved_mib: float
    dram_bandwidth_gbps: float
    shared_sram_bandwidth_gbps: float
    # Caches a block-per-row kernel's loads hit (see ComputeSpec.block_per_row_kernels):
    # a per-engine L1 (re-reads of rows it holds) and the shared SRAM (L2) as a cache in
    # front of DRAM. replay_resident_fraction: the share of the shared SRAM that holds data
    # read by every engine from one run to the next (a partitioned L2 keeps such lines in
    # both halves), so a replayed kernel whose inputs fit it reads them from there.
    l1_kib: float | None = None
    l1_latency_us: float | None = None
    l1_bandwidth_gbps: float | None = None      # per engine
    shared_sram_latency_us: float | None = None
    replay_resident_fraction: float | None = None
    # The shared SRAM is a hardware cache (a GPU's L2), not a scratchpad: a tensor the
    # schedule keeps there is still read and written by every kernel that uses it, at the
    # shared SRAM's bandwidth, and only the replay-resident share of it holds tensors that
    # every engine reads (the scheduler keeps at most that much).
    shared_sram_is_cache: bool = False

    @property
    def l1_bytes(self) -> int:
        return int((self.l1_kib or 0.0) * 1024)

    @property
    def replay_resident_bytes(self) -> int:
        return int(self.shared_sram_bytes * (self.replay_resident_fraction or 0.0))

    @property
    def local_sram_bytes(self) -> int:
        return int(self.local_sram_mib * MiB)

    @property
    def shared_sram_bytes(self) -> int:
        return int(self.shared_sram_mib * MiB)

    @property
    def dram_bytes(self) -> int:
        return int(self.dram_gib * GiB)

    @property
    def dram_usable_bytes(self) -> int:
        """DRAM left for models after the firmware/runtime reservation."""
        return self.dram_bytes - int(self.dram_reserved_mib * MiB)

    @property
    def dram_bandwidth(self) -> float:
        return self.dram_bandwidth_gbps * GB

    @property
    def shared_sram_bandwidth(self) -> float:
        return self.shared_sram_bandwidth_gbps * GB


@dataclass(frozen=True)
class DmaSpec:
    task_dma_bandwidth_gbps: float
    task_dma_setup_us: float
    # Fraction of the Task DMA bandwidth that row reductions (norms, softmax) achieve: they
    # alternate statistics and normalisation passes instead of streaming.
    reduction_efficiency: float = 1.0
    # A GPU has no DMA engine running ahead of the kernel stream: each kernel issues its own
    # loads once it is launched, and is launched only when the previous kernel has completed
    # (stream order). So nothing is prefetched across kernels and the launch gap is paid in
    # series with the loads. An NPU's Task DMA runs ahead (predictive DMA): false.
    loads_in_stream_order: bool = False

    @property
    def task_dma_bandwidth(self) -> float:
        return self.task_dma_bandwidth_gbps * GB

    @property
    def task_dma_setup_s(self) -> float:
        return self.task_dma_setup_us * US

    def bandwidth_for(self, kind: str) -> float:
        """Achieved Task DMA bandwidth for a kernel of class `kind`."""
        if kind in ("norm", "softmax", "reduction"):
            return self.task_dma_bandwidth * self.reduction_efficiency
        return self.task_dma_bandwidth


@dataclass(frozen=True)
class DieSpec:
    compute: ComputeSpec
    memory: MemorySpec
    dma: DmaSpec


@dataclass(frozen=True)
class PageableSpec:
    """How a host link copies from pageable (not page-locked) host memory.

    The DMA engine can only read page-locked memory, so the driver copies pageable data through a
    pinned staging buffer, chunk by chunk: the host memcpy of one chunk overlaps the DMA of the
    previous one, so the throughput is below the link's DMA rate and the first chunk's memcpy is
    not hidden. The figures are the achieved end-to-end rates of such copies.
    """

    bandwidth_gbps: float
    setup_us: float = 0.0
    d2h_bandwidth_gbps: float | None = None
    staging_chunk_mib: float | None = None
    staging_copy_gbps: float | None = None


@dataclass(frozen=True)
class LinkSpec:
    """A data path with an alpha-beta cost: latency_us per transfer plus bytes / bandwidth.

    For the host link, bandwidth_gbps and setup_us are the DMA path from pinned (page-locked)
    host memory; `pageable` describes copies from ordinary host memory, staged through pinned
    chunks. A host link without a `pageable` table copies both kinds of memory at the DMA rate.
    """

    name: str
    bandwidth_gbps: float
    setup_us: float = 0.0
    latency_us: float = 0.0
    # Host links may be slower towards the host; None means the same as bandwidth_gbps.
    d2h_bandwidth_gbps: float | None = None
    pageable: PageableSpec | None = None

    @property
    def bandwidth(self) -> float:
        return self.bandwidth_gbps * GB

    @property
    def alpha_s(self) -> float:
        return (self.setup_us + self.latency_us) * US

    def transfer_s(self, nbytes: int, to_device: bool = True, pinned: bool = False) -> float:
        """Seconds for one host copy of nbytes; pinned picks the DMA path over the staged one."""
        p = self.pageable
        if pinned or p is None:
            bw = self.bandwidth_gbps if to_device or self.d2h_bandwidth_gbps is None \
                else self.d2h_bandwidth_gbps
            return self.alpha_s + nbytes / (bw * GB)
        bw = p.bandwidth_gbps if to_device or p.d2h_bandwidth_gbps is None else p.d2h_bandwidth_gbps
        seconds = (p.setup_us + self.latency_us) * US + nbytes / (bw * GB)
        if p.staging_chunk_mib and p.staging_copy_gbps:
            seconds += min(nbytes, p.staging_chunk_mib * MiB) / (p.staging_copy_gbps * GB)
        return seconds


@dataclass(frozen=True)
class Links:
    die_to_die: LinkSpec
    card_to_card: LinkSpec


@dataclass(frozen=True)
class RuntimeSpec:
    launch_us: float
    sync_us: float

    @property
    def launch_s(self) -> float:
        return self.launch_us * US

    @property
    def sync_s(self) -> float:
        return self.sync_us * US


@dataclass(frozen=True)
class HostSpec:
    """The host CPU that runs fallback ops, as a small roofline."""

    gflops: float
    memory_bandwidth_gbps: float
    op_overhead_us: float

    def op_s(self, flops: float, nbytes: int) -> float:
        return self.op_overhead_us * US + max(flops / (self.gflops * 1e9),
                                               nbytes / (self.memory_bandwidth_gbps * GB))


@dataclass(frozen=True)
class PublishedTotals:
    fp16_tflops: float
    int8_tops: float
    dram_gib: float
    dram_bandwidth_gbps: float


@dataclass(frozen=True)
class ProductSpec:
    name: str
    family: str
    description: str
    dies: int
    die: DieSpec
    host_link: LinkSpec
    runtime: RuntimeSpec
    host: HostSpec
    links: Links
    power_w: float | None = None
    published_totals: PublishedTotals | None = None
    base: str | None = None
    source: str = ""  # where the spec was loaded from; filled in by the loader

    def __repr__(self) -> str:
        c, m = self.die.compute, self.die.memory
        return (f"ProductSpec({self.name}: {self.dies} x {self.family} die, "
                f"{c.fp16_tflops * self.dies:g} TFLOPS FP16, {m.dram_gib * self.dies:g} GiB DRAM)")


def builtin_products() -> list[str]:
    return sorted(_read_toml(p).get("name", p.stem) for p in SPEC_DIR.glob("*.toml"))


def load_spec(name_or_path: str | Path) -> ProductSpec:
    """Load a product by built-in name (e.g. "RBLN-CA25", any case) or from a TOML file path."""
    table, source = _resolve(str(name_or_path), seen=())
    spec = _build(ProductSpec, table, where=source)
    spec = dataclasses.replace(spec, source=source)
    _check_totals(spec)
    return spec


def spec_to_dict(spec: ProductSpec) -> dict:
    """The spec as plain data, so an artifact can carry the exact figures it was compiled for."""
    return dataclasses.asdict(spec)


def spec_from_dict(table: dict, where: str = "artifact") -> ProductSpec:
    spec = _build(ProductSpec, table, where=where)
    _check_totals(spec)
    return spec


def _resolve(name_or_path: str, seen: tuple[str, ...]) -> tuple[dict, str]:
    path = Path(name_or_path)
    if not (path.suffix == ".toml" or path.exists()):
        path = _builtin_path(name_or_path)
    if not path.is_file():
        raise SpecError(f"spec file {str(path)!r} does not exist")
    table = _read_toml(path)
    key = str(path.resolve())  # one spelling per file, so a cycle is caught however it is named
    if key in seen:
        raise SpecError(f"spec {path} inherits from itself through 'base'")
    base = table.get("base")
    if base is None:
        return table, str(path)
    if not isinstance(base, str):
        raise SpecError(f"'base' in {path} must be a product name, got {base!r}")
    if base.endswith(".toml") and not Path(base).is_absolute():
        base = str(path.parent / base)  # relative to the file naming it, not to the shell's cwd
    parent, _ = _resolve(base, seen + (key,))
    return _merge(parent, table), str(path)


def _builtin_path(name: str) -> Path:
    for path in SPEC_DIR.glob("*.toml"):
        if _read_toml(path).get("name", "").lower() == name.lower() or path.stem == name.lower():
            return path
    raise SpecError(f"unknown NPU product {name!r}; built-in products: {', '.join(builtin_products())}"
                    " (or give the path of a .toml spec file)")


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"spec file {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise SpecError(f"cannot read spec file {path}: {e}") from None


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _build(cls, table: dict, where: str, section: str = ""):
    """Build dataclass `cls` from a TOML table, rejecting unknown, missing and mistyped keys."""
    label = f"[{section}] in {where}" if section else where
    if not isinstance(table, dict):
        raise SpecError(f"{label} must be a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise SpecError(f"unknown key(s) {', '.join(unknown)} in {label}; expected: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        has_default = f.default is not dataclasses.MISSING
        if name not in table:
            if not has_default:
                raise SpecError(f"missing key {name!r} in {label}")
            continue
        values[name] = _convert(hints[name], table[name], f"{section + '.' if section else ''}{name}",
                                where)
    return cls(**values)


def _convert(hint, value, key: str, where: str):
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    if optional:
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where, key)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{key} in {where} must be a number, got {value!r}")
        if value < 0 or (value == 0 and not key.endswith("_us")):
            raise SpecError(f"{key} in {where} must be positive, got {value!r}")
        if (key.endswith("efficiency") or key.endswith("fraction")) and value > 1:
            raise SpecError(f"{key} in {where} is a fraction of peak and must be at most 1, got {value!r}")
        return float(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{key} in {where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise SpecError(f"{key} in {where} must be a positive integer, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise SpecError(f"{key} in {where} must be a string, got {value!r}")
        return value
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list) or len(value) != len(args):
            raise SpecError(f"{key} in {where} must be a list of {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, key, where) for a, v in zip(args, value))
    raise SpecError(f"{key} in {where}: unsupported field type {hint}")


def _check_totals(spec: ProductSpec) -> None:
    t = spec.published_totals
    if t is None:
        return
    c, m, n = spec.die.compute, spec.die.memory, spec.dies
    derived = {"fp16_tflops": c.fp16_tflops * n, "int8_tops": c.int8_tops * n,
               "dram_gib": m.dram_gib * n, "dram_bandwidth_gbps": m.dram_bandwidth_gbps * n}
    for key, value in derived.items():
        published = getattr(t, key)
        if abs(published - value) > 1e-6 * max(1.0, value):
            raise SpecError(f"{spec.source}: published_totals.{key} = {published:g} but {n} dies x "
                            f"die figure gives {value:g}; fix the die section or the totals")

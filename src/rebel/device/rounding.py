"""Rounding to the device's 16-bit format, in place, in native code where it can be.

Device tensors are FP32 tensors holding values the 16-bit dtype holds, so every kernel output
is rounded. `t.to(float16).to(float32)` does it with two casts and two allocations; `round_`
rounds the tensor's own memory instead: a few lines of C (csrc/round16.c: F16C for FP16, the
round-to-nearest-even bias for BF16), bit-identical to torch's conversions, loaded with ctypes.
`pip install` builds it (setup.py) beside this file as `_round16_<key>` + the extension suffix,
the key a hash of the C source and its header, so a library built from other sources is never
loaded. A checkout that was never installed builds it at first use instead: plain C needs no
torch headers, so that takes well under a second, once per machine, into the same cache torch's
extensions use. Both builds use OpenMP, so large tensors round on torch's intra-op threads.
Without either (no C compiler, or off x86) `round_` falls back to `t.copy_(t.to(dtype))`,
which gives the same values. The same library carries the few-row linear kernel
(csrc/linear_rows.c, `linear_rows`) and the kernel tails (csrc/epilogues.c, `epilogues`), so one
key names all the sources. The compiled-model
executor rounds through here, the lowest layer that rounds; the eager device (torch_rbln)
compiles the same C source into its shim.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "round16.c"
HEADER = SOURCE.with_name("round16.h")
SOURCES = (SOURCE, SOURCE.with_name("linear_rows.c"), SOURCE.with_name("epilogues.c"))
PREFIX = "_round16_"
OPENMP = ["-fopenmp"]  # compile and link flags of the builds (setup.py's too): see round16.c
# No fused multiply-adds the source does not write: see epilogues.c (setup.py's build too).
CFLAGS = ["-O2", "-ffp-contract=off"]
_lock = threading.Lock()
_lib = None
_loaded = False


def _cache_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch_extensions")
    return Path(root)


def key(*paths: Path) -> str:
    """A hash of the C sources and the header (default: this package's; setup.py names its
    build with it too)."""
    digest = hashlib.sha256()
    for path in paths or (*SOURCES, HEADER):
        data = path.read_bytes()
        digest.update(f"{path.name} {len(data)}\n".encode())
        digest.update(data)
    return digest.hexdigest()[:16]


def installed(folder: Path = Path(__file__).parent) -> Path | None:
    """The library `pip install` built from these sources, if there is one."""
    name = PREFIX + key()
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (folder / (name + suffix)).is_file():
            return folder / (name + suffix)
    return None


def _build() -> ctypes.CDLL | None:
    """The installed library, else round16.c compiled now (cached by source hash); None when
    impossible."""
    if os.environ.get("RBLN_NATIVE_ROUNDING", "1") == "0":
        return None
    target = installed()
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if target is None and compiler is None:
        return None
    target = target or _cache_dir() / f"rbln_round16-{key()}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                for flags in (OPENMP, []):  # without OpenMP one thread rounds: still correct
                    command = [compiler, *CFLAGS, "-shared", "-fPIC", *flags, "-o", str(built),
                               *map(str, SOURCES)]
                    if subprocess.run(command, capture_output=True, timeout=120).returncode == 0:
                        break
                else:
                    return None
                os.replace(built, target)  # atomic: concurrent builders never load a half file
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None
    for name in ("rbln_round_half", "rbln_round_bfloat16"):
        getattr(lib, name).argtypes = (ctypes.c_void_p, ctypes.c_int64)
        getattr(lib, name).restype = None
        getattr(lib, name + "_copy").argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
        getattr(lib, name + "_copy").restype = None
    lib.rbln_has_f16c.restype = ctypes.c_int
    lib.rbln_has_linear_rows.restype = lib.rbln_linear_max_rows.restype = ctypes.c_int
    lib.rbln_linear_rows.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                     ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)
    lib.rbln_linear_rows.restype = ctypes.c_int
    lib.rbln_has_epilogues.restype = ctypes.c_int
    lib.rbln_bias_act.argtypes = (ctypes.c_void_p,) * 3 + (ctypes.c_int64,) * 2 + (ctypes.c_int,) * 2
    lib.rbln_bias_act.restype = None
    lib.rbln_layer_norm.argtypes = (ctypes.c_void_p,) * 7 + (ctypes.c_int64,) * 2 + (ctypes.c_float, ctypes.c_int)
    lib.rbln_layer_norm.restype = None
    lib.rbln_batch_norm.argtypes = (ctypes.c_void_p,) * 6 + (ctypes.c_int64,) * 3 + (ctypes.c_float,) + \
        (ctypes.c_int,) * 3
    lib.rbln_batch_norm.restype = None
    return lib


def native():
    """The loaded C library, or None when rounding runs through torch."""
    global _lib, _loaded
    if not _loaded:
        with _lock:
            if not _loaded:
                _lib = _build()
                _loaded = True
    return _lib


def _rounders(suffix: str = "") -> dict:
    lib = native()
    table = {}
    if lib is not None:
        if lib.rbln_has_f16c():
            table[torch.float16] = getattr(lib, "rbln_round_half" + suffix)
        table[torch.bfloat16] = getattr(lib, "rbln_round_bfloat16" + suffix)
    return table


_NATIVE: dict | None = None


def round_(t: torch.Tensor, dtype: torch.dtype = torch.float16) -> bool:
    """Round float32 tensor `t` in place to values `dtype` holds. True if done (or nothing to
    do: not a float), False when `t` cannot be written in place (not float32, or elements
    that share memory, as after expand): the caller then rounds a copy."""
    global _NATIVE
    if t.dtype is not torch.float32:
        return not t.is_floating_point()
    if _NATIVE is None:
        _NATIVE = _rounders()
    fn = _NATIVE.get(dtype)
    if fn is not None and not t.is_meta and t.device.type == "cpu" and _dense(t):
        fn(t.data_ptr(), t.numel())  # a permuted dense tensor fills one block from data_ptr too
        return True
    if not _non_overlapping(t):
        return False
    t.copy_(t.to(dtype))
    return True


def rounder(dtype: torch.dtype):
    """`round_` for one dtype, its native routine looked up once: the generated executor calls it
    for every kernel output (hundreds per decode step), so the checks a contiguous CPU float32
    tensor needs are all it does before the C call; a dense permuted one (attention's output)
    has its layout's answer remembered. Anything else takes `round_` itself."""
    global _NATIVE
    if _NATIVE is None:
        _NATIVE = _rounders()
    fn = _NATIVE.get(dtype)
    if fn is None:
        return round_
    f32 = torch.float32
    dense: dict = {}  # (shape, strides) -> _dense: attention's transposed output, every run

    def round_native(t: torch.Tensor, dtype: torch.dtype = dtype) -> bool:
        if t.dtype is f32 and t.is_cpu:
            if t.is_contiguous():
                fn(t.data_ptr(), t.numel())
                return True
            layout = (t.shape, t.stride())
            if layout not in dense:
                if len(dense) >= 1024:
                    dense.clear()
                dense[layout] = _dense(t)
            if dense[layout]:
                fn(t.data_ptr(), t.numel())
                return True
        return round_(t, dtype)
    return round_native


def _dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill one block of memory from its data pointer, each once (contiguous,
    or a permutation of contiguous, as attention's transposed output): an elementwise rounding
    may then run over that block in whatever order the memory holds it."""
    if t.is_contiguous():
        return True
    span = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s > 1):
        if stride != span:
            return False
        span *= size
    return True


def _non_overlapping(t: torch.Tensor) -> bool:
    """No two elements share memory (a sufficient test: strides sorted, each past the span of
    the dims below it), so writing every element in place is well defined."""
    if t.is_contiguous():
        return True
    span = 1
    dims = sorted(((st, s) for s, st in zip(t.shape, t.stride()) if s > 1))
    for stride, size in dims:
        if stride < span:
            return False
        span = stride * size
    return True


def round_copier(dtype: torch.dtype):
    """`rounded` for one dtype, writing a contiguous CPU float32 tensor's rounded copy in one
    native pass (an input cast: the caller's tensor stays as it was); anything else takes
    `rounded`."""
    global _COPIERS
    if _COPIERS is None:
        _COPIERS = _rounders("_copy")
    fn = _COPIERS.get(dtype)
    if fn is None:
        return rounded
    f32 = torch.float32

    def round_copy(value, dtype: torch.dtype = dtype):
        if isinstance(value, torch.Tensor) and value.dtype is f32 and value.is_cpu \
                and value.is_contiguous():
            out = torch.empty_like(value)
            fn(value.data_ptr(), out.data_ptr(), value.numel())
            return out
        return rounded(value, dtype)
    return round_copy


_COPIERS: dict | None = None


def rounded(value, dtype: torch.dtype):
    """A rounded copy (FP32 storage) of floats; other values pass through. The reference path."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            return value.to(dtype).to(torch.float32)
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(rounded(v, dtype) for v in value)
    return value

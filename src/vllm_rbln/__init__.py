"""vLLM platform plugin for RBLN NPUs (virtual ATOM): `LLM(model=compiled_folder)` serves a model
compiled by optimum.rbln, with vLLM's continuous batching, chunked prefill, prefix caching and
structured outputs.

vLLM finds the plugin through the `vllm.platform_plugins` entry point. Installing open-rbln must
not take vLLM over on a machine that has a real accelerator, so the plugin activates when
`RBLN_VLLM_PLATFORM=1` or `VLLM_PLUGINS` names `rbln`, or when none of vLLM's accelerator
platforms (CUDA, ROCm, TPU, XPU) is found: on a CPU-only machine the virtual NPU is the
accelerator. `RBLN_VLLM_PLATFORM=0` always turns it off.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys

DEVICES = (None, "auto", "rbln")
ACCELERATORS = ("cuda", "rocm", "tpu", "xpu")  # vLLM's built-in platforms that are real hardware


def register() -> str | None:
    """Entry point: the platform class vLLM should use, or None to leave vLLM its own. vLLM
    calls it in every process."""
    _accept_device_argument()
    return "vllm_rbln.platform.RblnPlatform" if wanted() else None


def wanted() -> bool:
    """Whether this process should serve on the virtual NPU (see the module docstring)."""
    switch = os.environ.get("RBLN_VLLM_PLATFORM")
    if switch in ("0", "1"):
        return switch == "1"
    named = os.environ.get("VLLM_PLUGINS")
    if named is not None and "rbln" in [p.strip() for p in named.split(",")]:
        return True
    return not any(_detects(name) for name in ACCELERATORS)


def _detects(name: str) -> bool:
    from vllm import platforms

    detect = platforms.builtin_platform_plugins.get(name)
    try:
        return detect is not None and detect() is not None
    except Exception:  # a probe that fails (driver libraries half there) found nothing usable
        return False


def _accept_device_argument() -> None:
    """Let `LLM(..., device="rbln")` (the RBLN SDK's spelling) work: vLLM 0.32 dropped the
    `device` engine argument, and the platform is chosen by this plugin anyway. `vllm.engine.
    arg_utils` is not imported yet when vLLM calls `register`, so wrap it when it loads."""
    module = sys.modules.get("vllm.engine.arg_utils")
    if module is not None and hasattr(module, "EngineArgs"):
        _wrap_engine_args(module)
    elif not any(isinstance(f, _PatchArgUtils) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchArgUtils())


def _wrap_engine_args(module) -> None:
    for cls in (module.EngineArgs, getattr(module, "AsyncEngineArgs", None)):
        if cls is None or getattr(cls.__init__, "_rbln_device", False):
            continue

        @functools.wraps(cls.__init__)
        def __init__(self, *args, device=None, _init=cls.__init__, **kwargs):
            active = device is None or wanted()
            if device == "rbln" and not active:
                raise ValueError("device='rbln': vLLM chose another platform on this machine "
                                 "(it has a real accelerator); set RBLN_VLLM_PLATFORM=1 or "
                                 "VLLM_PLUGINS=rbln to serve on the virtual NPU")
            if active and device not in DEVICES:
                raise ValueError(f"device={device!r}: the vllm_rbln platform serves device='rbln' "
                                 f"(set RBLN_VLLM_PLATFORM=0 to use vLLM's own platforms)")
            if not active and device not in DEVICES:  # not ours: vLLM's own error for it
                kwargs["device"] = device
            _init(self, *args, **kwargs)

        __init__._rbln_device = True
        cls.__init__ = __init__


class _PatchArgUtils(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "vllm.engine.arg_utils":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _wrap_engine_args(module)

        spec.loader.exec_module = exec_module
        return spec

"""vLLM platform plugin for RBLN NPUs (virtual ATOM): `LLM(model=compiled_folder)` serves a model
compiled by optimum.rbln, with vLLM's continuous batching, chunked prefill, prefix caching and
structured outputs.

vLLM finds the plugin through the `vllm.platform_plugins` entry point; `RBLN_VLLM_PLATFORM=0`
turns it off (vLLM then falls back to its own platforms).
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys

DEVICES = (None, "auto", "rbln")


def register() -> str | None:
    """Entry point: the platform class vLLM should use. vLLM calls it in every process."""
    if os.environ.get("RBLN_VLLM_PLATFORM", "1") == "0":
        return None
    _accept_device_argument()
    return "vllm_rbln.platform.RblnPlatform"


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
            if device not in DEVICES:
                raise ValueError(f"device={device!r}: the vllm_rbln platform serves device='rbln' "
                                 f"(set RBLN_VLLM_PLATFORM=0 to use vLLM's own platforms)")
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

"""Build (once per machine) and load the C++ shim in csrc/rbln_shim.cpp.

torch.utils.cpp_extension compiles it against the installed torch's headers at first use and
caches the library under $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), in a folder
named after a hash of the source, torch and Python: checkouts with different shim sources (or
venvs with different torch builds) on one machine then neither rebuild over each other nor load
each other's library. Nothing prebuilt ships with the package. About 20 s on 2 cores.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

SOURCE = Path(__file__).parent / "csrc" / "rbln_shim.cpp"
_module = None


def _build_directory() -> str:
    import torch
    from torch.utils import cpp_extension

    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(f"{torch.__version__} {torch.version.cuda} {sys.version}".encode())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    folder = Path(root) / f"rbln_shim-{key.hexdigest()[:16]}"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


def load():
    global _module
    if _module is not None:
        return _module
    from torch.utils import cpp_extension

    try:
        _module = cpp_extension.load(
            name="rbln_shim", sources=[str(SOURCE)], extra_cflags=["-O2"],
            build_directory=_build_directory(),
            verbose=os.environ.get("TORCH_RBLN_VERBOSE_BUILD", "0") == "1")
    except Exception as e:
        raise RuntimeError(
            f"torch_rbln could not build its C++ shim ({SOURCE.name}) with "
            f"torch.utils.cpp_extension: {e}. A C++17 compiler (g++) and ninja are needed; set "
            "TORCH_RBLN_VERBOSE_BUILD=1 to see the compiler output.") from e
    return _module

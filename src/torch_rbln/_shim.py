"""Load the eager device's C++ shim: csrc/rbln_shim.cpp, with rebel's 16-bit rounder compiled in.

`pip install` (and `pip install -e`) builds it as a torch CppExtension (setup.py) into this
package, as a module named after a build key: a hash of its source files' contents, the torch
build and the Python. `load()` imports the module whose key the sources installed beside it and
the running torch give, so a library built from other sources (a checkout edited since its
`pip install -e`) or against another torch is never loaded. Checking before importing matters:
importing the library registers its kernels and device guard with PyTorch, which no later load
can undo.

Without that module (a checkout on PYTHONPATH that was never installed, or one edited since),
torch.utils.cpp_extension builds it at first use (about 20 s on 2 cores) and caches it under
$TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) in a folder named after the same key:
checkouts with different shim sources, or venvs with different torch builds, neither rebuild over
each other nor load each other's library, while two checkouts of the same sources share one
build: the key holds no path, and the build compiles copies of the sources kept in its folder.

Stdlib only at import (setup.py loads this file by path to name what it builds).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

SOURCE = Path(__file__).parent / "csrc" / "rbln_shim.cpp"
PREFIX = "_rbln_shim_"
_module = None


def rounder_dir() -> Path:
    """rebel/device/csrc (round16.c and round16.h), found without importing rebel."""
    spec = importlib.util.find_spec("rebel")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("torch_rbln needs the rebel package (rebel/device/csrc/round16.c) beside it")
    return Path(list(spec.submodule_search_locations)[0]) / "device" / "csrc"


def sources(shim: Path = SOURCE, rounder: Path | None = None) -> tuple[list[Path], Path]:
    """(files compiled, include folder): the shim and the rounder it compiles in."""
    rounder = rounder_dir() if rounder is None else rounder
    return [shim, rounder / "round16.c"], rounder


def module_name(files: list[Path], include: Path, torch_version: str, torch_cuda) -> str:
    """The extension's module name: PREFIX + a hash of every source file's name and contents
    (the header too), the torch build and the Python; no paths."""
    key = hashlib.sha256()
    for path in [*files, include / "round16.h"]:
        data = path.read_bytes()
        key.update(f"{path.name} {len(data)}\n".encode())
        key.update(data)
    key.update(f"{torch_version} {torch_cuda} {sys.version}".encode())
    return PREFIX + key.hexdigest()[:16]


def _stage(folder: Path, files: list[Path]) -> Path:
    """Copies of the sources in the build folder, so the compiler commands hold no checkout path:
    another checkout of the same sources then finds the build up to date instead of rebuilding it
    (cpp_extension and ninja compare the commands). Same key, same contents: copied once."""
    staged = folder / "src"
    staged.mkdir(parents=True, exist_ok=True)
    for path in files:
        target = staged / path.name
        if not target.exists():
            partial = staged / f".{path.name}.{os.getpid()}"
            shutil.copyfile(path, partial)
            os.replace(partial, target)  # atomic: a concurrent builder never reads half a file
    return staged


def _jit_build(name: str, files: list[Path], include: Path):
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    folder = Path(root) / f"rbln_shim-{name[len(PREFIX):]}"
    staged = _stage(folder, [*files, include / "round16.h"])
    try:
        return cpp_extension.load(
            name=name, sources=[str(staged / f.name) for f in files], extra_include_paths=[str(staged)],
            extra_cflags=["-O2"], build_directory=str(folder),
            verbose=os.environ.get("TORCH_RBLN_VERBOSE_BUILD", "0") == "1")
    except Exception as e:
        raise RuntimeError(
            f"torch_rbln could not build its C++ shim ({SOURCE.name}) with "
            f"torch.utils.cpp_extension: {e}. A C++17 compiler (g++) and ninja are needed; set "
            "TORCH_RBLN_VERBOSE_BUILD=1 to see the compiler output. `pip install` of open-rbln "
            "builds it ahead instead.") from e


def locate() -> tuple[str, bool]:
    """(module name, True if a build of it is installed in this package)."""
    import torch

    files, include = sources()
    name = module_name(files, include, torch.__version__, torch.version.cuda)
    return name, importlib.util.find_spec(f"{__package__}.{name}") is not None


def load():
    """The shim module: the installed build when it matches, else a build made now."""
    global _module
    if _module is not None:
        return _module
    name, installed = locate()
    if installed:
        _module = importlib.import_module(f"{__package__}.{name}")
    else:
        _module = _jit_build(name, *sources())
    return _module

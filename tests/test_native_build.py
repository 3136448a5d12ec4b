"""The native libraries (torch_rbln's shim, rebel's 16-bit rounder) are built at `pip install`
and found by a key of their sources; a checkout never installed builds them at first use."""
from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import torch_rbln
from rebel.device import rounding
from torch_rbln import _shim

SRC = Path(torch_rbln.__file__).parents[1]
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _copy_sources(root: Path) -> tuple[list[Path], Path]:
    files, include = _shim.sources()
    (root / "shim").mkdir(parents=True)
    (root / "rounder").mkdir()
    shutil.copy(files[0], root / "shim")
    for name in ("round16.c", "round16.h", "linear_rows.c", "epilogues.c"):
        shutil.copy(include / name, root / "rounder")
    return _shim.sources(root / "shim" / files[0].name, root / "rounder")


def test_shim_key_depends_on_contents_and_torch_not_on_paths(tmp_path):
    a, b = _copy_sources(tmp_path / "a"), _copy_sources(tmp_path / "checkout elsewhere")
    here = _shim.module_name(*_shim.sources(), torch.__version__, torch.version.cuda)
    key = _shim.module_name(*a, torch.__version__, torch.version.cuda)
    assert key == here == _shim.module_name(*b, torch.__version__, torch.version.cuda)
    assert key.startswith(_shim.PREFIX) and key.isidentifier()
    assert _shim.module_name(*a, "2.14.0+cpu", None) != key
    header = b[1] / "round16.h"
    header.write_text(header.read_text() + "\n")  # any source byte, the header's too
    assert _shim.module_name(*b, torch.__version__, torch.version.cuda) != key


def test_rounder_key_depends_on_contents_not_on_paths(tmp_path):
    _, rounder = _copy_sources(tmp_path)
    files = [rounder / n for n in ("round16.c", "linear_rows.c", "epilogues.c", "round16.h")]
    copy = rounding.key(*files)
    assert copy == rounding.key()
    for edited in files[:3]:  # any source of the library
        edited.write_text(edited.read_text() + "/* edit */\n")
        assert rounding.key(*files) != copy


def test_installed_rounder_found_only_under_its_key(tmp_path):
    assert rounding.installed(tmp_path) is None
    (tmp_path / f"{rounding.PREFIX}0123456789abcdef{SUFFIX}").write_bytes(b"stale")
    assert rounding.installed(tmp_path) is None
    lib = tmp_path / f"{rounding.PREFIX}{rounding.key()}{SUFFIX}"
    lib.write_bytes(b"current")
    assert rounding.installed(tmp_path) == lib


def _installed_shim() -> bool:
    return _shim.locate()[1]


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "PYTHONPATH", "TORCH_EXTENSIONS_DIR")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full, timeout=600)


NO_JIT = """
    import torch.utils.cpp_extension as ext
    def refuse(*a, **k):
        raise AssertionError("cpp_extension.load called")
    ext.load = refuse
    import torch, torch_rbln
    from torch_rbln import _shim
    from rebel.device import rounding
    x = torch.ones(2, device="rbln") * 3
    assert x.cpu().tolist() == [3.0, 3.0]
    print(_shim._module.__name__, rounding.native()._name)
"""


@pytest.mark.skipif(not _installed_shim(), reason="shim not built for this checkout: run "
                    "`pip install -e .` (make does) or `python setup.py build_ext --inplace`")
def test_installed_package_loads_prebuilt_shim_without_compiling(tmp_path):
    out = _run(NO_JIT, TORCH_DEVICE_BACKEND_AUTOLOAD="0", TORCH_EXTENSIONS_DIR=str(tmp_path), CC="/nonexistent")
    assert out.returncode == 0, out.stderr
    module, lib = out.stdout.split()
    name, _ = _shim.locate()
    assert module == f"torch_rbln.{name}"
    assert Path(lib) == rounding.installed()
    assert not any(tmp_path.iterdir())  # nothing built at first use


@pytest.mark.slow
def test_uninstalled_checkout_builds_shim_at_first_use(tmp_path):
    """A copy of the sources without the built libraries: the JIT fallback builds both, under
    keys that hold no path (a second copy elsewhere reuses the build)."""
    copy = tmp_path / "src"
    shutil.copytree(SRC / "rebel", copy / "rebel", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copytree(SRC / "torch_rbln", copy / "torch_rbln", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or tmp_path / "ext")  # a dev's warm cache if set
    code = NO_JIT.replace("ext.load = refuse", "")
    out = _run(code, PYTHONPATH=str(copy), TORCH_DEVICE_BACKEND_AUTOLOAD="0", TORCH_EXTENSIONS_DIR=str(cache))
    assert out.returncode == 0, out.stderr
    module, lib = out.stdout.split()
    name, _ = _shim.locate()
    assert module == name  # the first-use build, same key as the installed one would have
    assert (cache / f"rbln_shim-{name[len(_shim.PREFIX):]}").is_dir()
    assert Path(lib) == cache / f"rbln_round16-{rounding.key()}.so"
    built = sorted((cache / f"rbln_shim-{name[len(_shim.PREFIX):]}").glob("*.so"))
    stamps = [p.stat().st_mtime_ns for p in built]
    moved = tmp_path / "moved"
    copy.rename(moved)  # another checkout path, same sources: the cached build, not compiled again
    out = _run(code, PYTHONPATH=str(moved), TORCH_DEVICE_BACKEND_AUTOLOAD="0", TORCH_EXTENSIONS_DIR=str(cache))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == name
    assert [p.stat().st_mtime_ns for p in built] == stamps and len(built) == 1

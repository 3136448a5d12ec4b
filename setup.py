"""Native parts of open-rbln, compiled at `pip install` (also `pip install -e`, which puts them in src/).

pyproject.toml holds everything else; setuptools runs this file for the two libraries:
  * torch_rbln's C++ shim (torch_rbln/csrc/rbln_shim.cpp with rebel/device/csrc/round16.c), a torch
    CppExtension against the torch in the build environment (pinned in [build-system]);
  * rebel's native library (rebel/device/csrc: round16.c, the 16-bit rounder, linear_rows.c, the
    few-row linear kernel, and epilogues.c, the kernel tails), a plain C library that rebel.device.rounding loads with ctypes.
Each is named after the key its loader computes from the sources installed beside it
(torch_rbln/_shim.py, rebel/device/rounding.py), so a stale build is never loaded; both loaders
compile at first use when no matching build is installed.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from pathlib import Path

# The build environment needs no numpy; torch warns at import when it is absent
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
from setuptools import Extension, setup  # noqa: E402
from setuptools.command.build_ext import build_ext as setuptools_build_ext  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension  # noqa: E402

ROOT = Path(__file__).parent
SRC = Path("src")  # setuptools wants source paths relative to this file


def _load(path: Path):
    """A module of ours by file path: importing the packages would run their __init__."""
    spec = importlib.util.spec_from_file_location(f"_setup_{path.stem}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shim = _load(SRC / "torch_rbln" / "_shim.py")
rounding = _load(SRC / "rebel" / "device" / "rounding.py")
shim_files, rounder_dir = shim.sources(SRC / "torch_rbln" / "csrc" / "rbln_shim.cpp",
                                       SRC / "rebel" / "device" / "csrc")
shim_name = shim.module_name([ROOT / f for f in shim_files], ROOT / rounder_dir,
                             torch.__version__, torch.version.cuda)
rounder_name = rounding.PREFIX + rounding.key()


class build_ext(BuildExtension):
    """torch's BuildExtension for the shim; the rounder with the plain C compiler, since
    BuildExtension would compile it as C++ with torch's flags.

    Builds in place (`pip install -e`) first remove the libraries there: those of earlier keys, and
    the current one too, so the new file is a new inode rather than one written over in place
    while a running Python has it mapped (which would crash that process)."""

    def initialize_options(self):
        super().initialize_options()
        # `pip install -e` compiles in a fresh temporary folder each time; objects kept in build/
        # let ninja recompile only what changed (the Makefile's second install, for the vllm
        # extra, then takes seconds instead of a minute). --build-temp still overrides it.
        self.build_temp = os.path.join("build", f"native-{sys.implementation.cache_tag}")

    def run(self):
        if self.inplace or getattr(self, "editable_mode", False):
            for package, prefix in (("torch_rbln", shim.PREFIX), ("rebel/device", rounding.PREFIX)):
                for old in (ROOT / SRC / package).glob(prefix + "*"):
                    old.unlink()
        super().run()

    def build_extensions(self):
        plain = [e for e in self.extensions if not e.name.startswith("torch_rbln.")]
        everything, self.extensions = self.extensions, [e for e in self.extensions if e not in plain]
        try:
            build_temp, self.build_temp = self.build_temp, os.path.join(self.build_temp, "c")
            for ext in plain:  # before BuildExtension patches the compiler for C++; its own
                setuptools_build_ext.build_extension(self, ext)  # objects: the shim builds round16.c too
            self.build_temp = build_temp
            super().build_extensions()
        finally:
            self.extensions = everything


# -O2 as the first-use builds; -g0: Python's own flags ask for debug info, 7 MB of it here
setup(
    ext_modules=[
        CppExtension(f"torch_rbln.{shim_name}", [str(f) for f in shim_files],
                     include_dirs=[str(ROOT.resolve() / rounder_dir)], extra_compile_args=["-O2", "-g0"]),
        Extension(f"rebel.device.{rounder_name}",
                  [str(SRC / "rebel" / "device" / "csrc" / f.name) for f in rounding.SOURCES],
                  depends=[str(SRC / "rebel" / "device" / "csrc" / "round16.h")],
                  extra_compile_args=[*rounding.CFLAGS, "-g0", *rounding.OPENMP], extra_link_args=rounding.OPENMP),
    ],
    cmdclass={"build_ext": build_ext},
)

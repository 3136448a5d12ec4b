"""Put our `rebel` and `torch_rbln` on a venv's path without our `optimum` namespace.

Why: in the vendor environment `import optimum.rbln` must be the vendor's package, while `rebel`
and `torch_rbln` are this repository's, live (edits show at once, as with `pip install -e`). A
`.pth` pointing at `src/` would also expose our `src/optimum`, which shadows or merges with the
vendor's. So this makes a folder inside the venv holding only links to those two packages and a
`.pth` naming that folder. The native libraries in src/ (built there by .venv's `pip install -e`)
come along with the links; where they are missing, rebel and torch_rbln compile them at first use.
Run with the venv's python:

    .venv-vendor/bin/python packaging/vendor-compat/link_ours.py          # link
    .venv-vendor/bin/python packaging/vendor-compat/link_ours.py --deps   # print our runtime deps
"""
from __future__ import annotations

import sys
import sysconfig
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("rebel", "torch_rbln")


def runtime_deps() -> list[str]:
    """Our pyproject's runtime dependencies (what `rebel` imports), so the two stay in sync."""
    with open(REPO / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def link() -> Path:
    folder = Path(sys.prefix) / "open-rbln-path"
    folder.mkdir(exist_ok=True)
    for name in PACKAGES:
        target, entry = REPO / "src" / name, folder / name
        if not (target / "__init__.py").is_file():
            raise SystemExit(f"{target} is not a package; run from a checkout of open-rbln")
        if entry.is_symlink() or entry.exists():
            entry.unlink()
        entry.symlink_to(target, target_is_directory=True)
    pth = Path(sysconfig.get_paths()["purelib"]) / "open_rbln_core.pth"
    pth.write_text(f"{folder}\n")
    return pth


if __name__ == "__main__":
    if sys.argv[1:] == ["--deps"]:
        print("\n".join(runtime_deps()))
    else:
        print(f"linked {', '.join(PACKAGES)} from {REPO / 'src'} via {link()}")

"""Shared checks of the compatibility suite: numerics against FP32 and host-fallback counts."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

import rebel

# The device computes in fp16 (our default 16-bit format): a few layers of tiny random-weight
# models stay well inside these; a wrong op, layout or label shows as a cosine far below them.
COSINE_MIN = 0.999
REL_MAX_ABS = 2e-2  # max |got - want| relative to max(1, max |want|)


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, cosine_min: float = COSINE_MIN,
                 rel_max_abs: float = REL_MAX_ABS) -> tuple[float, float]:
    """got (from the reloaded vendor model) matches want (the FP32 model) within fp16 tolerance.
    Returns (max abs error, cosine) for the record."""
    got, want = torch.as_tensor(got).float(), torch.as_tensor(want).float()
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {list(got.shape)} != FP32 {list(want.shape)}"
    assert want.numel() and want.abs().max().item() > 1e-3, (
        f"{what}: the FP32 reference is all ~0 ({want.abs().max().item() if want.numel() else 0:.3g}); "
        f"a comparison with it proves nothing: change the model's config")
    max_abs = (got - want).abs().max().item()
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
    scale = max(1.0, want.abs().max().item())
    assert cosine >= cosine_min and max_abs <= rel_max_abs * scale, (
        f"{what}: max abs {max_abs:.3g} (limit {rel_max_abs * scale:.3g}), cosine {cosine:.6f} "
        f"(min {cosine_min})")
    return max_abs, cosine


def compiled_graphs(folder: Path) -> dict[str, Path]:
    """Every compiled graph save_pretrained wrote (pipelines keep one subfolder per component)."""
    return {str(p.relative_to(folder)): p for p in sorted(Path(folder).rglob("*.rbln"))}


def host_fallbacks(folder: Path) -> dict[str, int]:
    """Host-fallback op count of each saved graph, as rebel.explain reports them (all buckets)."""
    return {name: sum(b.host_ops for b in rebel.explain(path).buckets)
            for name, path in compiled_graphs(folder).items()}


def assert_host_fallbacks(folder: Path, expected: dict[str, int] | None = None,
                          graphs: int | None = None) -> dict[str, int]:
    """Each graph in `folder` has the expected number of host fallbacks (0 unless listed)."""
    counts = host_fallbacks(folder)
    assert counts, f"no compiled .rbln graph under {folder}"
    if graphs is not None:
        assert len(counts) == graphs, f"expected {graphs} compiled graph(s), found {sorted(counts)}"
    expected = expected or {}
    want = {name: expected.get(name, 0) for name in counts}
    assert counts == want, f"host fallbacks per graph {counts}, expected {want}"
    return counts


# Vendor APIs our rebel does not have yet (issue 10 items 2-3); a failure naming one of them is
# the expected failure of a strict xfail, any other failure is a real one.
MISSING_API = ("rebel.compile_context", "rbln_custom_ops")


class MissingVendorAPI(Exception):
    """The vendor layer called a rebel API we do not implement yet (CompileContext, custom ops)."""


@contextlib.contextmanager
def needs_vendor_api():
    """Turn a failure that names a missing vendor API into MissingVendorAPI; others pass through."""
    try:
        yield
    except Exception as e:
        chain, link = [], e  # the vendor's lazy importer wraps the ModuleNotFoundError
        while link is not None and len(chain) < 10:
            chain.append(f"{type(link).__name__}: {link}")
            link = link.__cause__ or link.__context__
        text = " <- ".join(chain)
        if any(name in text for name in MISSING_API):
            raise MissingVendorAPI(text[:500]) from e
        raise

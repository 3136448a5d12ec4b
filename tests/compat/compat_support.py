"""Shared checks of the compatibility suite: numerics against FP32 and host-fallback counts."""
from __future__ import annotations

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


# --- generative models: greedy tokens against the FP32 model ---------------------------------

MARGIN_MAX = 0.1  # a disagreement is accepted only where FP32's top-2 logits are this close


def left_padded_prompts(lengths, vocab: int, pad_id: int = 0, seed: int = 0):
    """A batch of random prompts of the given lengths, left-padded with `pad_id`: (ids, mask)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def decoder_only_logits(model, prompt_mask: torch.Tensor):
    """FP32 logits of a decoder-only model teacher-forced on whole sequences (prompt + generated),
    positions counted from each row's first real token as HF generate counts them."""
    def logits(seq: torch.Tensor) -> torch.Tensor:
        extra = seq.shape[1] - prompt_mask.shape[1]
        mask = torch.cat([prompt_mask, torch.ones(seq.shape[0], extra, dtype=prompt_mask.dtype)], 1)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        with torch.no_grad():
            return model(input_ids=seq, attention_mask=mask, position_ids=positions).logits.float()
    return logits


def assert_greedy_matches(got: torch.Tensor, want: torch.Tensor, prompt_len: int, logits_fn,
                          what: str, margin_max: float = MARGIN_MAX) -> dict:
    """The vendor model's greedy tokens `got` equal FP32 `want`, or every token that differs from
    what FP32 picks after the same prefix is FP32's second choice at a top-2 margin below
    `margin_max`. `logits_fn(seq)` gives FP32 logits [B, L, V] teacher-forced on `seq`, so every
    step of `got` is judged, also after a first (accepted) divergence. Returns counts."""
    got, want = torch.as_tensor(got).long(), torch.as_tensor(want).long()
    assert got.shape == want.shape, f"{what}: generated {list(got.shape)} tokens, FP32 {list(want.shape)}"
    assert torch.equal(got[:, :prompt_len], want[:, :prompt_len]), f"{what}: the prompt came back changed"
    logits = logits_fn(got)[:, prompt_len - 1:-1]  # the step that chose each generated token
    top2 = logits.topk(2, dim=-1)
    margin = top2.values[..., 0] - top2.values[..., 1]
    tokens = got[:, prompt_len:]
    # a test that cannot fail proves nothing: most FP32 steps must be decisive
    decisive = (margin >= margin_max).float().mean().item()
    assert decisive >= 0.5, (f"{what}: only {decisive:.0%} of FP32 steps have a top-2 margin >= "
                             f"{margin_max}: make the random model's logits sharper")
    differs = tokens != top2.indices[..., 0]
    for b, t in differs.nonzero().tolist():
        assert tokens[b, t] == top2.indices[b, t, 1] and margin[b, t] < margin_max, (
            f"{what}: row {b} step {t}: got token {tokens[b, t].item()}, FP32 picks "
            f"{top2.indices[b, t, 0].item()} with a top-2 margin {margin[b, t].item():.3g} "
            f"(accepted below {margin_max}); got {got[b, prompt_len:].tolist()}, "
            f"FP32 {want[b, prompt_len:].tolist()}")
    return {"equal": bool(torch.equal(got, want)), "disagreements": int(differs.sum())}

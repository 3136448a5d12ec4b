"""Next-token choice for one engine step, with vLLM's SamplingParams semantics: allowed tokens,
logit bias and penalties on the raw logits, then temperature (0 means greedy), min-p, top-k and top-p, and a per-request seed.

The grammar bitmask of structured outputs (one int32 word per 32 tokens, bit set = allowed) masks
the logits before anything else, as vLLM's own samplers do.
"""
from __future__ import annotations

import numpy as np
import torch
from vllm import SamplingParams

_EPS = 1e-5  # vLLM treats temperatures below this as greedy


def apply_bitmask(logits: torch.Tensor, words: np.ndarray) -> torch.Tensor:
    """Disallow every token whose bit is 0 in `words` [n_words] (int32)."""
    bits = torch.from_numpy(words.astype(np.int64) & 0xFFFFFFFF)
    allowed = (bits[:, None] >> torch.arange(32)) & 1
    allowed = allowed.flatten()[: logits.shape[-1]].bool()
    if allowed.numel() < logits.shape[-1]:
        allowed = torch.cat([allowed, allowed.new_zeros(logits.shape[-1] - allowed.numel())])
    return logits.masked_fill(~allowed, float("-inf"))


def apply_token_rules(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """allowed_token_ids keeps only those tokens; logit_bias adds to the named tokens' logits."""
    if params.allowed_token_ids:
        keep = torch.full_like(logits, float("-inf"))
        keep[torch.tensor(params.allowed_token_ids, dtype=torch.long)] = 0.0
        logits = logits + keep
    for token, bias in (params.logit_bias or {}).items():
        logits[int(token)] += bias
    return logits


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt: list[int],
                    output: list[int]) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens; presence and frequency penalties over
    output tokens only (vLLM's definitions)."""
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long)
        if len(seen):
            values = logits[seen]
            logits[seen] = torch.where(values > 0, values / params.repetition_penalty,
                                       values * params.repetition_penalty)
    if output and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output), minlength=logits.shape[-1]).to(logits.dtype)
        logits -= params.frequency_penalty * counts[: logits.shape[-1]]
        logits -= params.presence_penalty * (counts[: logits.shape[-1]] > 0).to(logits.dtype)
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from one request's logits [vocab] (already penalised and masked)."""
    if params.temperature < _EPS:
        return int(logits.argmax())
    scores = logits / params.temperature
    if params.min_p > 0:
        probs = torch.softmax(scores, -1)
        scores = scores.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    vocab = scores.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(ordered, -1).cumsum(-1)
        drop = cumulative - torch.softmax(ordered, -1) > params.top_p  # keep the token crossing p
        scores = scores.scatter(0, order, ordered.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, -1)
    return int(torch.multinomial(probs, 1, generator=generator))

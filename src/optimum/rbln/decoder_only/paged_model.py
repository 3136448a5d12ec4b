"""Kept for imports that predate `rebel.plan`: the paged causal LM lives in `rebel.plan.paged`
(the planner, below optimum in the layers, builds the same model from a config alone)."""
from rebel.plan.paged import (ATTENTION, PagedCausalLM, PagedContext, kv_heads_and_dim,  # noqa: F401
                              paged_attention_forward)

__all__ = ["ATTENTION", "PagedCausalLM", "PagedContext", "kv_heads_and_dim",
           "paged_attention_forward"]

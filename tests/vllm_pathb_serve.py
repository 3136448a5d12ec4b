"""Path B driver: `LLM(model=<HF folder>, device="rbln", ...)` with VLLM_RBLN_USE_VLLM_MODEL=1
(vLLM's own model classes compiled by torch.compile(backend="rbln")), greedy token ids out.

Run as a script (vLLM engines want a fresh process and `if __name__ == "__main__"`):
    python vllm_pathb_serve.py REQUEST.json
REQUEST.json: {"llm": {LLM kwargs}, "prompts": [token-id lists], "max_tokens": n}, or
"rounds": [[token-id lists], ...] instead of "prompts" (one generate call each, in turn). Prints
`RESULT {"tokens": [...], "stats": [rbln_stats of every worker], "rounds": [stats after each
round]}`.
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_RBLN_USE_VLLM_MODEL", "1")


def main(path: str) -> None:
    from vllm import LLM, SamplingParams

    request = json.loads(open(path).read())
    llm = LLM(**request["llm"])
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True)
    tokens, rounds = [], []
    for prompts in request.get("rounds", [request.get("prompts")]):
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        tokens += [list(o.outputs[0].token_ids) for o in outputs]
        rounds.append(llm.collective_rpc("rbln_stats"))
    print("RESULT " + json.dumps({"tokens": tokens, "stats": rounds[-1], "rounds": rounds}))


if __name__ == "__main__":
    main(sys.argv[1])

"""Serve a compiled folder with vLLM on the rbln platform and print the outputs as JSON.

Run as a script (vLLM engines want a fresh process and `if __name__ == "__main__"`):
    python vllm_serve.py REQUEST.json
where REQUEST.json holds a list of cases, each {"llm": {LLM kwargs}, "prompts": [str or token
ids], "sampling": {SamplingParams kwargs, "choice": [...] for structured output} or a list of
them, "after": optional prompts for a second generate call on the same engine, "stand_in":
optional {"boost": {token id: logit}} to replace the compiled graphs' logits by
`stand_in_logits`, "metrics": optional list of vLLM metric names (`llm.get_metrics()`, which
needs "disable_log_stats": false) whose values to report}. A case that raises prints its error instead; it prints `RESULT <json list>`
at the end.
"""
from __future__ import annotations

import json
import os
import sys


STAND_IN = "RBLN_TEST_STAND_IN"


def stand_in_logits(token: int, position: int, vocab: int, boost: dict | None = None):
    """Fixed logits for (last token, position): what a test's direct call of vLLM's Sampler can
    reproduce without the model. `boost` adds to some tokens' logits."""
    import torch
    g = torch.Generator().manual_seed(token * 4096 + position)
    logits = torch.randn(vocab, generator=g) * 4
    for t, value in (boost or {}).items():
        logits[int(t)] += value
    return logits


def install_stand_in(spec: dict, vocab: int) -> None:
    """Patch the paged graphs of this process (vLLM's engine core)."""
    from types import SimpleNamespace

    import torch
    from optimum.rbln.decoder_only.session import PagedGraphs

    report = SimpleNamespace(latency_s=1e-4)
    boost = spec.get("boost")

    def prefill_chunk(self, tokens, start, table):
        return stand_in_logits(int(tokens[-1]), start + len(tokens) - 1, vocab, boost), report

    def decode(self, tokens, positions, tables):
        return torch.stack([stand_in_logits(int(t), int(p), vocab, boost)
                            for t, p in zip(tokens, positions)]), report

    PagedGraphs.prefill_chunk, PagedGraphs.decode = prefill_chunk, decode


def main(path: str) -> None:
    cases = json.loads(open(path).read())
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    results = []
    for case in cases:
        try:
            results.append(run(LLM, SamplingParams, StructuredOutputsParams, case))
        except Exception as error:  # noqa: BLE001  (the test reads the message)
            results.append({"error": f"{type(error).__name__}: {error}"})
    print("RESULT " + json.dumps(results))


def run(LLM, SamplingParams, StructuredOutputsParams, request: dict) -> dict:
    if "stand_in" in request:  # the engine core re-imports this script: see the module's end
        from transformers import AutoConfig
        vocab = AutoConfig.from_pretrained(request["llm"]["model"]).vocab_size
        os.environ[STAND_IN] = json.dumps({**request["stand_in"], "vocab": vocab})
    llm = LLM(**request["llm"])
    sampling = request.get("sampling", {})
    if isinstance(sampling, dict):
        sampling = [sampling] * len(request["prompts"])
    params = []
    for kwargs in sampling:
        kwargs = dict(kwargs)
        if "logit_bias" in kwargs:  # JSON object keys are strings
            kwargs["logit_bias"] = {int(t): v for t, v in kwargs["logit_bias"].items()}
        if "choice" in kwargs:
            kwargs["structured_outputs"] = StructuredOutputsParams(choice=kwargs.pop("choice"))
        params.append(SamplingParams(**kwargs))
    outputs = []
    for batch in (request["prompts"], request.get("after", [])):
        if batch:
            prompts = [{"prompt_token_ids": p} if isinstance(p, list) else p for p in batch]
            outputs += llm.generate(prompts, params[:len(prompts)], use_tqdm=False)
    [stats] = llm.collective_rpc("rbln_stats")
    wanted = request.get("metrics", [])
    metrics = {name: 0 for name in wanted}
    for metric in (llm.get_metrics() if wanted else []):
        if metric.name in metrics:  # one sample per engine: add them up
            metrics[metric.name] += metric.value
    return {"metrics": metrics, "outputs": [{"text": o.outputs[0].text, "tokens": list(o.outputs[0].token_ids),
                         "logprobs": [{str(t): [lp.logprob, lp.rank] for t, lp in position.items()}
                                      for position in o.outputs[0].logprobs or []]}
                        for o in outputs], "stats": stats}


if __name__ == "__main__":
    main(sys.argv[1])
elif __name__ == "__mp_main__" and os.environ.get(STAND_IN):
    # vLLM's engine core, a spawned process, imports the main script under this name first
    _spec = json.loads(os.environ[STAND_IN])
    install_stand_in(_spec, _spec["vocab"])

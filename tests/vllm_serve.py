"""Serve a compiled folder with vLLM on the rbln platform and print the outputs as JSON.

Run as a script (vLLM engines want a fresh process and `if __name__ == "__main__"`):
    python vllm_serve.py REQUEST.json
where REQUEST.json holds a list of cases, each {"llm": {LLM kwargs}, "prompts": [str or token
ids], "sampling": {SamplingParams kwargs, "choice": [...] for structured output} or a list of
them, "after": optional prompts for a second generate call on the same engine}. A case that raises prints its error instead; it prints `RESULT <json list>` at the end.
"""
from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    results = []
    for case in json.loads(open(path).read()):
        try:
            results.append(run(LLM, SamplingParams, StructuredOutputsParams, case))
        except Exception as error:  # noqa: BLE001  (the test reads the message)
            results.append({"error": f"{type(error).__name__}: {error}"})
    print("RESULT " + json.dumps(results))


def run(LLM, SamplingParams, StructuredOutputsParams, request: dict) -> dict:
    llm = LLM(**request["llm"])
    sampling = request.get("sampling", {})
    if isinstance(sampling, dict):
        sampling = [sampling] * len(request["prompts"])
    params = []
    for kwargs in sampling:
        kwargs = dict(kwargs)
        if "choice" in kwargs:
            kwargs["structured_outputs"] = StructuredOutputsParams(choice=kwargs.pop("choice"))
        params.append(SamplingParams(**kwargs))
    outputs = []
    for batch in (request["prompts"], request.get("after", [])):
        if batch:
            prompts = [{"prompt_token_ids": p} if isinstance(p, list) else p for p in batch]
            outputs += llm.generate(prompts, params[:len(prompts)], use_tqdm=False)
    [stats] = llm.collective_rpc("rbln_stats")
    return {"outputs": [{"text": o.outputs[0].text, "tokens": list(o.outputs[0].token_ids),
                         "logprobs": [{str(t): [lp.logprob, lp.rank] for t, lp in position.items()}
                                      for position in o.outputs[0].logprobs or []]}
                        for o in outputs], "stats": stats}


if __name__ == "__main__":
    main(sys.argv[1])

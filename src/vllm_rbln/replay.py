"""Serve a request trace on the virtual NPU in the chip's time: the real counterpart of
`rebel.plan.serving.simulate`.

A served model's wall clock here is the emulation's, hundreds of times slower than the chip, so
arrivals by wall clock would queue requests the chip would have finished. `replay` keeps a
virtual clock instead: it steps vLLM's engine in this process one engine step at a time (vLLM's
in-process engine core: `VLLM_ENABLE_V1_MULTIPROCESSING=0`), advances the clock by the step's
predicted NPU time (the runner's `rbln_stats`), admits the trace's requests when the clock
passes their arrival and stamps each output token with the clock of its step. The model really
runs: the tokens are computed, only the time is the chip's. (When a request was first scheduled
is the scheduler's business, inside the engine core: queueing time is the simulation's figure.)
"""
from __future__ import annotations

import random
from collections.abc import Sequence

from rebel.plan.serving import RequestResult, ServingResult, TraceRequest


def _npu_seconds(llm) -> float:
    """Predicted NPU time of every step so far, on the first tensor-parallel rank."""
    stats = llm.collective_rpc("rbln_stats")[0]
    return stats["prefill_s"] + stats["decode_s"]


def replay(llm, trace: Sequence[TraceRequest]) -> ServingResult:
    """Serve `trace` on `llm` (a `vllm.LLM` on the rbln platform, in-process engine core) in
    virtual time. Prompts are random token ids sharing no prefix, as in `simulate`."""
    from vllm import SamplingParams
    from vllm.v1.engine.core_client import InprocClient

    engine = llm.llm_engine
    if not isinstance(engine.engine_core, InprocClient):
        raise RuntimeError("replay steps the engine core itself: create the LLM with "
                           "VLLM_ENABLE_V1_MULTIPROCESSING=0 in the environment")
    if engine.has_unfinished_requests():
        raise RuntimeError("the engine still has requests: replay starts from an idle engine")
    trace = sorted(trace, key=lambda r: r.arrival_s)
    results = {f"replay-{i}": RequestResult(r.arrival_s, r.prompt_len, r.output_len)
               for i, r in enumerate(trace)}
    seen = dict.fromkeys(results, 0)
    rng = random.Random(0)
    vocab = engine.model_config.get_vocab_size()
    clock, busy, steps, nxt = 0.0, 0.0, 0, 0
    spent = _npu_seconds(llm)
    while nxt < len(trace) or engine.has_unfinished_requests():
        while nxt < len(trace) and trace[nxt].arrival_s <= clock:
            r = trace[nxt]
            ids = [rng.randrange(1, vocab) for _ in range(r.prompt_len)]
            engine.add_request(f"replay-{nxt}", {"prompt_token_ids": ids},
                               SamplingParams(max_tokens=r.output_len, min_tokens=r.output_len,
                                              ignore_eos=True, temperature=0.0, detokenize=False),
                               arrival_time=r.arrival_s)
            nxt += 1
        if not engine.has_unfinished_requests():
            clock = trace[nxt].arrival_s
            continue
        outputs = engine.step()
        now = _npu_seconds(llm)
        seconds, spent = now - spent, now
        clock += seconds
        busy += seconds
        steps += seconds > 0  # as simulate counts: steps that ran graphs
        for output in outputs:
            count = len(output.outputs[0].token_ids)
            result = results[output.request_id]
            result.token_s += [clock] * (count - seen[output.request_id])
            seen[output.request_id] = count
    return ServingResult(list(results.values()), steps, busy)

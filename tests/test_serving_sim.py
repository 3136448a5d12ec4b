"""Serving simulation (rebel.plan.serving): vLLM's scheduler replayed in virtual time, each step
costed by the compiled graphs' predicted time without computing; and the same trace served for
real by vllm_rbln in the chip's time (vllm_rbln.replay) gives the same latencies."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig

from optimum.rbln import RBLNLlamaForCausalLM
from optimum.rbln.decoder_only.step_cost import GraphStepCost
from rebel import InputError
from rebel.plan.serving import (TraceRequest, load_trace, percentile, poisson_trace,
                                step_seconds)

from test_optimum_llm import SMALL, save_model

OPTIONS = dict(rbln_batch_size=4, rbln_max_seq_len=128, rbln_kvcache_partition_len=32,
               rbln_prefill_chunk_size=16, rbln_decoder_batch_sizes=[1, 2, 4])


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    model = RBLNLlamaForCausalLM.from_pretrained(save_model(root / "hf", LlamaConfig(**SMALL)),
                                                 export=True, **OPTIONS)
    model.save_pretrained(root / "compiled")
    return model, root / "compiled", root / "hf"


class Recorder:
    """A cost that records the calls a step makes."""

    chunk, decode_batch = 16, 4

    def __init__(self):
        self.calls = []

    def prefill_s(self, tokens, start):
        self.calls.append(("prefill", tokens, start))
        return 1.0

    def decode_s(self, positions):
        self.calls.append(("decode", list(positions)))
        return 0.25


def test_step_calls_the_graphs_as_the_runner_does():
    cost = Recorder()
    seconds = step_seconds(cost, [(40, 0), (1, 7), (1, 9), (17, 16), (1, 3), (1, 4), (1, 5)])
    assert cost.calls == [("prefill", 16, 0), ("prefill", 16, 16), ("prefill", 8, 32),
                          ("prefill", 16, 16), ("prefill", 1, 32),
                          ("decode", [7, 9, 3, 4]), ("decode", [5])]
    assert seconds == 5 * 1.0 + 2 * 0.25


def test_predict_equals_the_runs_report(compiled):
    """Runtime.predict gives the report a run gives (same timeline), computing nothing."""
    graphs = compiled[0].paged_graphs()
    table = torch.tensor([0, 1, 2, 3])
    for n, start in ((16, 0), (5, 16), (9, 40)):
        _, report = graphs.prefill_chunk(torch.arange(10, 10 + n), start, table)
        assert graphs.predict_prefill_chunk(n, start).latency_s == report.latency_s
    positions = torch.tensor([3, 60, 100])
    tables = torch.tensor([[4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]])
    _, report = graphs.decode(torch.tensor([5, 6, 7]), positions, tables)
    predicted = graphs.predict_decode(positions)
    assert predicted.latency_s == report.latency_s and predicted.wall_time_s == 0.0
    # attention follows the context: a longer context reads more of the KV cache
    longer = graphs.predict_decode(torch.tensor([120, 120, 120]))
    assert sum(longer.bytes_moved.values()) > sum(predicted.bytes_moved.values())
    with pytest.raises(InputError, match="decode positions"):
        graphs.predict_decode(torch.tensor([500]))


def test_traces(tmp_path):
    a, b = poisson_trace(50, 4.0, (10, 20), 8, seed=3), poisson_trace(50, 4.0, (10, 20), 8, seed=3)
    assert a == b and all(10 <= r.prompt_len <= 20 and r.output_len == 8 for r in a)
    gaps = [y.arrival_s - x.arrival_s for x, y in zip(a, a[1:])]
    assert all(g > 0 for g in gaps) and 0.1 < sum(gaps) / len(gaps) < 0.5  # mean 1/rate
    path = tmp_path / "trace.jsonl"
    path.write_text('{"arrival_s": 0.5, "prompt_len": 30, "output_len": 4}\n\n'
                    '{"arrival_time": 0.1, "prompt_tokens": 7, "output_tokens": 2}\n')
    assert load_trace(path) == [TraceRequest(0.1, 7, 2), TraceRequest(0.5, 30, 4)]
    path.write_text('{"arrival_s": 0.5, "prompt_len": "many"}\n')
    with pytest.raises(InputError, match="trace.jsonl:1"):
        load_trace(path)
    with pytest.raises(InputError, match="output_len >= 1"):
        TraceRequest(0.0, 5, 0)
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5 and percentile([1.0], 99) == 1.0


def test_simulated_latencies_by_hand(compiled):
    """Two requests, a fixed cost per call: the clock the scheduler's steps give by hand."""
    pytest.importorskip("vllm")
    from rebel.plan.serving import scheduler_config, simulate
    vllm_config, kv = scheduler_config(compiled[1], max_num_seqs=4, max_model_len=128,
                                       block_size=32, num_blocks=17)
    result = simulate([TraceRequest(0.0, 10, 3), TraceRequest(0.5, 40, 2)], Recorder(),
                      vllm_config, kv)
    first, second = result.requests
    # step 1 (t=0): prefill 10 -> t=1; step 2: decode r0 + prefill 40 (16+16+8) -> t=4.25
    assert first.token_s == [1.0, 4.25, 4.5] and second.token_s == [4.25, 4.5]
    assert first.ttft_s == 1.0 and second.ttft_s == 3.75 and second.queued_s == 0.5
    assert first.tpot_s == 1.75 and result.steps == 3
    assert result.percentiles("ttft")[50] == pytest.approx(2.375)
    with pytest.raises(InputError, match="max_model_len=128"):
        simulate([TraceRequest(0.0, 120, 20)], Recorder(), vllm_config, kv)


REPLAY = """
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM
from optimum.rbln import RBLNLlamaForCausalLM
from optimum.rbln.decoder_only.step_cost import GraphStepCost
from rebel.plan import Predictor
from rebel.plan.serving import poisson_trace, simulate
from vllm_rbln.replay import replay
folder, hf = sys.argv[1], sys.argv[2]
trace = poisson_trace(24, 2000.0, (5, 60), (2, 12), seed=2)
llm = LLM(model=folder, device="rbln", max_num_seqs=4, max_model_len=128, block_size=32,
          skip_tokenizer_init=True)
real = replay(llm, trace)
scheduler = llm.llm_engine.engine_core.engine_core.scheduler
model = RBLNLlamaForCausalLM.from_pretrained(folder)
sim = simulate(trace, GraphStepCost.of(model), scheduler.vllm_config, scheduler.kv_cache_config)
o = model.rbln_config  # rbln-plan's costs from the config alone, at the folder's options
predictor = Predictor(hf, chunk=o.prefill_chunk_size, chunk_sizes=o.prefill_chunk_sizes,
                      batches=o.decoder_batch_sizes, max_seq_len=o.max_seq_len,
                      block_size=o.kvcache_block_size)
planned = simulate(trace, predictor.step_cost(), scheduler.vllm_config, scheduler.kv_cache_config)
print("RESULT " + json.dumps({"real": real.summary(), "sim": sim.summary(), "plan": planned.summary(),
                              "tokens": [len(r.token_s) for r in real.requests]}))
"""


@pytest.mark.slow
def test_simulation_agrees_with_a_real_run(compiled, tmp_path):
    """The same trace served by vllm_rbln (real compute, the chip's clock) and simulated (no
    compute), with the compiled folder's step costs and with rbln-plan's from the config alone:
    TTFT and TPOT percentiles within 5%."""
    pytest.importorskip("vllm")
    script = tmp_path / "replay.py"
    script.write_text(REPLAY)
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, str(script), str(compiled[1]), str(compiled[2])], capture_output=True,
                         text=True, timeout=600, env=env)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-5000:]
    got = json.loads(lines[-1][len("RESULT "):])
    real, sim = got["real"], got["sim"]
    trace = poisson_trace(24, 2000.0, (5, 60), (2, 12), seed=2)
    assert got["tokens"] == [r.output_len for r in trace]  # every token served
    assert real["requests"] == sim["requests"] == 24 and real["busy_s"] > 0
    for key in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_p50_s", "tpot_p90_s", "tpot_p99_s"):
        assert sim[key] == pytest.approx(real[key], rel=0.05), key
        assert got["plan"][key] == pytest.approx(real[key], rel=0.05), key  # rbln-plan, config only
    assert real["ttft_p99_s"] > real["ttft_p50_s"]  # 24 requests at once queue behind 4 slots


def test_scheduler_config_on_the_rbln_platform(compiled, monkeypatch):
    """A process already on vllm_rbln's platform (serving, or a test before this one) can still
    build a simulation's configuration for a model that is only a config.json."""
    pytest.importorskip("vllm")
    import vllm.platforms

    from rebel.plan.serving import scheduler_config
    from vllm_rbln.platform import RblnPlatform

    monkeypatch.setattr(vllm.platforms, "_current_platform", RblnPlatform())
    vllm_config, kv = scheduler_config(compiled[2], max_num_seqs=2, max_model_len=128,
                                       block_size=32, num_blocks=9)
    assert vllm_config.scheduler_config.max_num_seqs == 2 and kv.num_blocks == 9
    assert "RBLN_VLLM_SIMULATION" not in os.environ

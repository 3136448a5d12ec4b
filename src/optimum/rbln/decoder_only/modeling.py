"""Decoder-only LLMs on the device: one compiled model holding a prefill graph per prefill chunk
size (rbln_prefill_chunk_sizes: a short prompt runs a short chunk) and a decoder_batch_<b> graph
per decode batch size, sharing weights and the paged KV cache."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

import rebel
from rebel import InputError

from ..configuration import RBLNConfig, RBLNConfigError
from ..modeling import RBLNModel
from rebel.plan.paged import PagedCausalLM, kv_heads_and_dim
from .session import PagedGraphs, PagedSession, SlotPool

_POOL_LOCK = threading.Lock()


@dataclass
class GenerationReport:
    """Predicted figures are for the modelled NPU (RBLN-CA25 by default); wall is this machine."""

    batch: int
    new_tokens: int
    time_to_first_token_s: float   # predicted: every prompt's prefill chunks, in turn
    per_output_token_s: float      # predicted: mean decode step
    predicted_s: float
    wall_s: float

    @property
    def predicted_tokens_per_s(self) -> float:
        return self.new_tokens / self.predicted_s if self.predicted_s else 0.0

    @property
    def wall_tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s else 0.0

    def __str__(self) -> str:
        return (f"{self.new_tokens} tokens for {self.batch} sequence(s): predicted TTFT "
                f"{self.time_to_first_token_s * 1e3:.2f} ms, {self.per_output_token_s * 1e3:.2f} ms "
                f"per output token, {self.predicted_tokens_per_s:.1f} tokens/s on the NPU; "
                f"emulated at {self.wall_tokens_per_s:.1f} tokens/s here")


class RBLNDecoderOnlyModelForCausalLM(RBLNModel):
    hf_auto_class = AutoModelForCausalLM
    model_types = ("llama", "qwen2", "qwen3", "mistral")

    @classmethod
    def _check_config(cls, config, options: RBLNConfig) -> None:
        heads, (kv_heads, _) = config.num_attention_heads, kv_heads_and_dim(config)
        tp = options.tensor_parallel_size
        if heads % tp or kv_heads % tp:
            raise RBLNConfigError(f"rbln_tensor_parallel_size={tp} must divide the model's "
                                  f"{heads} attention heads and {kv_heads} KV heads")

    @classmethod
    def _compile(cls, model, options: RBLNConfig):
        o = options
        blocks = o.batch_size * o.blocks_per_sequence
        paged = PagedCausalLM(model, num_blocks=blocks, block_size=o.block_size,
                              partition_len=o.kvcache_partition_len).eval()

        def graph_inputs(batch: int, tokens: int):
            return [torch.zeros(batch, tokens, dtype=torch.long),
                    torch.zeros(batch, tokens, dtype=torch.long),
                    torch.zeros(batch, o.blocks_per_sequence, dtype=torch.long),
                    torch.zeros(batch, dtype=torch.long)]

        buckets = [graph_inputs(batch, tokens) for _, batch, tokens in graph_shapes(o)]
        compiled = rebel.compile_from_torch(paged, example_inputs=buckets, npu=o.npu,
                                            tensor_parallel_size=o.tensor_parallel_size,
                                            device_dtype=o.device_dtype)
        return {"model": compiled}

    @property
    def graph_names(self) -> list[str]:
        """The graphs in the compiled model, in bucket order: "prefill" (a whole chunk),
        "prefill_<n>" per shorter prefill chunk, "decoder_batch_<b>" per decode batch."""
        return [name for name, _, _ in graph_shapes(self.rbln_config)]

    @property
    def generation_config(self) -> GenerationConfig:
        if getattr(self, "_generation_config", None) is None:
            try:
                self._generation_config = GenerationConfig.from_pretrained(self._source)
            except (OSError, TypeError, ValueError):
                self._generation_config = GenerationConfig.from_model_config(self.config)
        return self._generation_config

    def paged_graphs(self) -> PagedGraphs:
        """Low-level access for a serving engine that manages KV-cache blocks itself."""
        return PagedGraphs(self._runtime(), self.rbln_config)

    def start_session(self, prompts: list[torch.Tensor], *, wait: bool = False) -> PagedSession:
        """Low-level access: prefill these prompts, then step them token by token. The session
        holds KV-cache slots of this model until `session.close()` (or garbage collection);
        too few free slots is an InputError (wait=True, as generate() does, waits for other
        generate() calls to finish instead)."""
        return PagedSession(self._runtime(), self.rbln_config, prompts, self._slot_pool(), wait)

    def _slot_pool(self) -> SlotPool:
        """The model's KV-cache slots, lent to sessions (concurrent generate() calls each get
        their own slots, so they never overwrite each other's cache)."""
        with _POOL_LOCK:
            pool = getattr(self, "_slots", None)
            if pool is None:
                pool = self._slots = SlotPool(self.rbln_config.batch_size)
            return pool

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int | None = None, do_sample: bool | None = None,
                 temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, streamer=None, seed: int | None = None,
                 generation_config: GenerationConfig | None = None, **unsupported) -> torch.Tensor:
        """Like transformers' generate for decoder-only models: left-padded batches, greedy or
        sampling (temperature, top-k, top-p, seed), max_new_tokens, EOS and stop tokens, a
        streamer. Returns prompt + new tokens; `last_generation_report` has the timing."""
        if unsupported.pop("num_beams", 1) != 1:
            raise InputError("beam search is not supported; use greedy or sampling")
        unsupported.pop("use_cache", None)
        if unsupported:
            raise InputError(f"unsupported generate() argument(s): {', '.join(sorted(unsupported))}")
        gc = generation_config or self.generation_config
        max_new_tokens = max_new_tokens if max_new_tokens is not None else (gc.max_new_tokens or 20)
        do_sample = gc.do_sample if do_sample is None else do_sample
        eos = eos_token_id if eos_token_id is not None else gc.eos_token_id
        eos = set([eos] if isinstance(eos, int) else (eos or []))
        pad = pad_token_id if pad_token_id is not None else (
            gc.pad_token_id if gc.pad_token_id is not None else (min(eos) if eos else 0))
        input_ids = _as_batch(input_ids)
        mask = torch.ones_like(input_ids) if attention_mask is None else _as_batch(attention_mask)
        if mask.shape != input_ids.shape:
            raise InputError(f"attention_mask {list(mask.shape)} does not match input_ids "
                             f"{list(input_ids.shape)}")
        prompts = [row[m.bool()] for row, m in zip(input_ids, mask)]
        processors = _processors(do_sample, temperature if temperature is not None else gc.temperature,
                                 top_k if top_k is not None else gc.top_k,
                                 top_p if top_p is not None else gc.top_p)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None

        if streamer is not None and len(prompts) != 1:
            raise InputError("streaming supports one sequence at a time (as transformers' streamers do)")
        start = time.perf_counter()
        session = self.start_session(prompts, wait=True)
        try:
            return self._generate(session, input_ids, prompts, processors, do_sample, generator,
                                  max_new_tokens, eos, pad, streamer, start)
        finally:
            session.close()

    def _generate(self, session, input_ids, prompts, processors, do_sample, generator,
                  max_new_tokens, eos, pad, streamer, start) -> torch.Tensor:
        if streamer is not None:
            streamer.put(input_ids.cpu())
        logits = session.prefill()
        b = len(prompts)
        budget = [min(max_new_tokens, self.rbln_config.max_seq_len - len(p)) for p in prompts]
        generated = [[] for _ in range(b)]
        running = [i for i in range(b) if budget[i] > 0]
        history = [p.tolist() for p in prompts]
        while running:
            tokens = self._choose(logits, [history[i] for i in running], processors, do_sample, generator)
            still = []
            for token, i in zip(tokens.tolist(), running):
                generated[i].append(token)
                history[i].append(token)
                if token not in eos and len(generated[i]) < budget[i]:
                    still.append(i)
            if streamer is not None:
                streamer.put(tokens)
            running = still
            if running:
                logits = session.step(torch.tensor([history[i][-1] for i in running]), running)
        if streamer is not None:
            streamer.end()
        self.last_generation_report = _report(session, sum(len(g) for g in generated),
                                              time.perf_counter() - start)
        width = max((len(g) for g in generated), default=0)
        out = torch.full((b, width), pad, dtype=input_ids.dtype)
        for i, g in enumerate(generated):
            out[i, :len(g)] = torch.tensor(g, dtype=input_ids.dtype)
        return torch.cat([input_ids, out], dim=1)

    @staticmethod
    def _choose(logits, histories, processors, do_sample: bool, generator) -> torch.Tensor:
        scores = logits.float()
        if processors:
            width = max(len(h) for h in histories)
            ids = torch.tensor([[0] * (width - len(h)) + h for h in histories])
            scores = processors(ids, scores)
        if do_sample:
            probs = torch.softmax(scores, dim=-1)
            return torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return scores.argmax(-1)


def graph_shapes(o: RBLNConfig) -> list[tuple[str, int, int]]:
    """(name, batch, tokens) of each compiled graph, in bucket order. The whole prefill chunk
    comes first (bucket 0, as in folders compiled with one prefill graph), then the shorter
    chunks, then the decode batches."""
    shorter = [c for c in o.prefill_chunk_sizes if c != o.prefill_chunk_size]
    return [("prefill", 1, o.prefill_chunk_size), *((f"prefill_{c}", 1, c) for c in shorter),
            *((f"decoder_batch_{b}", b, 1) for b in o.decoder_batch_sizes)]


def _processors(do_sample: bool, temperature, top_k, top_p) -> LogitsProcessorList:
    steps = LogitsProcessorList()
    if not do_sample:
        return steps
    if temperature is not None and temperature != 1.0:
        if temperature <= 0:
            raise InputError(f"temperature must be positive when sampling, got {temperature}")
        steps.append(TemperatureLogitsWarper(temperature))
    if top_k:
        steps.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        steps.append(TopPLogitsWarper(top_p))
    return steps


def left_padded(prompts: list, pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for prompts of different lengths, padded on the left as
    decoder-only generate expects."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.as_tensor(p)
        mask[row, width - len(p):] = 1
    return ids, mask


def _as_batch(t) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise InputError(f"input_ids must be [batch, tokens], got shape {list(t.shape)}")
    return t.long()


def _report(session: PagedSession, new_tokens: int, wall_s: float) -> GenerationReport:
    t = session.timing
    ttft = sum(t.prefill_s)
    tpot = sum(t.decode_s) / len(t.decode_s) if t.decode_s else 0.0
    return GenerationReport(len(session.prompts), new_tokens, ttft, tpot, ttft + sum(t.decode_s), wall_s)


class RBLNLlamaForCausalLM(RBLNDecoderOnlyModelForCausalLM):
    model_types = ("llama",)


class RBLNQwen2ForCausalLM(RBLNDecoderOnlyModelForCausalLM):
    model_types = ("qwen2",)


class RBLNQwen3ForCausalLM(RBLNDecoderOnlyModelForCausalLM):
    model_types = ("qwen3",)


class RBLNMistralForCausalLM(RBLNDecoderOnlyModelForCausalLM):
    model_types = ("mistral",)

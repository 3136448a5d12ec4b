"""`rbln_*` options: parsed, checked before any compile work, saved as rbln_config.json."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from rebel import InputError, RBLNError

CONFIG_NAME = "rbln_config.json"
CONFIG_VERSION = 1
MIN_PREFILL_BUCKET = 64   # the default prefill graphs stop halving here (a chat prompt: 30-60 tokens)
PREFILL_BUCKETS = 3       # at most this many halving sizes: each is one more capture of the model
SHORT_PREFILL_STEP = 16   # below MIN_PREFILL_BUCKET the default sizes step by this many tokens


class RBLNConfigError(RBLNError, ValueError):
    """An rbln_* option is unknown, of the wrong type, or inconsistent with another."""


@dataclass
class RBLNConfig:
    """Everything that shapes the compiled graphs, plus where to run them.

    batch_size: most sequences decoded together. max_seq_len: prompt + generated tokens.
    kvcache_partition_len: attention partition length (the device attends to the context one
    partition at a time, combining partial softmaxes); divides max_seq_len.
    kvcache_block_size: tokens per KV-cache block (the unit a serving engine allocates and its
    prefix cache shares); divides kvcache_partition_len, defaults to it. Blocks smaller than a
    partition let vLLM's prefix cache reuse whole blocks of a shared prompt prefix.
    prefill_chunk_size: prompt tokens per prefill run (longer prompts loop chunks on the host).
    prefill_chunk_sizes: prefill graphs to compile, the largest being prefill_chunk_size; a chunk
      runs in the smallest that holds it, so a short prompt (or a prompt's last chunk) pays a
      short chunk, not a whole one. Default (`default_prefill_buckets`): prefill_chunk_size and
      its halves down to MIN_PREFILL_BUCKET tokens, then steps of SHORT_PREFILL_STEP below
      (128 -> [32, 48, 64, 128]); each graph is one more compile of the model, so a few
      sizes, not every one. A folder compiled
      before this option existed holds one prefill graph and loads as [prefill_chunk_size].
    decoder_batch_sizes: decode graphs to compile (default: just batch_size).
    """

    batch_size: int = 1
    max_seq_len: int | None = None
    kvcache_partition_len: int | None = None
    kvcache_block_size: int | None = None
    prefill_chunk_size: int = 128
    prefill_chunk_sizes: list[int] | None = None
    decoder_batch_sizes: list[int] | None = None
    tensor_parallel_size: int = 1
    npu: str | None = None
    device_dtype: str = "float16"
    device: int | list[int] | None = None
    create_runtimes: bool = True
    model_type: str = ""
    architecture: str = ""
    extra: dict = field(default_factory=dict)

    # options that only say where/whether to run; never saved
    RUNTIME_ONLY = ("device", "create_runtimes")

    @classmethod
    def from_kwargs(cls, kwargs: dict, base: RBLNConfig | None = None) -> RBLNConfig:
        """Take rbln_<name> keyword arguments (and plain <name> keys of rbln_config=dict)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"model_type", "architecture", "extra"}
        values = dataclasses.asdict(base) if base else {}
        for key, value in kwargs.items():
            name = key.removeprefix("rbln_")
            if name not in known:
                raise RBLNConfigError(f"unknown option {key!r}; known rbln_* options: "
                                      f"{', '.join('rbln_' + k for k in sorted(known))}")
            values[name] = value
        return cls(**values)

    def finalize(self, max_position_embeddings: int | None, decoder: bool = True) -> RBLNConfig:
        """Fill defaults from the model and check every option against the others (decoder:
        also the KV-cache, chunk and decode-batch options, which encoders do not use)."""
        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RBLNConfigError(f"rbln_{name} must be a positive integer, got {value!r}")

        if self.max_seq_len is None:
            self.max_seq_len = min(max_position_embeddings or 2048, 8192)
        if self.kvcache_partition_len is None:
            self.kvcache_partition_len = min(self.max_seq_len, 4096)
        if decoder and self.kvcache_block_size is None:
            self.kvcache_block_size = self.kvcache_partition_len
        for name in ("batch_size", "max_seq_len", "kvcache_partition_len", "prefill_chunk_size",
                     "tensor_parallel_size", *(("kvcache_block_size",) if decoder else ())):
            positive_int(name)
        if max_position_embeddings and self.max_seq_len > max_position_embeddings:
            raise RBLNConfigError(f"rbln_max_seq_len={self.max_seq_len} exceeds the model's "
                                  f"max_position_embeddings={max_position_embeddings}")
        if self.device_dtype not in ("float16", "bfloat16"):
            raise RBLNConfigError(f"rbln_device_dtype must be 'float16' or 'bfloat16', got "
                                  f"{self.device_dtype!r}")
        if not decoder:
            return self
        if self.max_seq_len % self.kvcache_partition_len:
            raise RBLNConfigError(f"rbln_kvcache_partition_len={self.kvcache_partition_len} must divide "
                                  f"rbln_max_seq_len={self.max_seq_len}")
        if self.kvcache_partition_len % self.kvcache_block_size:
            raise RBLNConfigError(f"rbln_kvcache_block_size={self.kvcache_block_size} must divide "
                                  f"rbln_kvcache_partition_len={self.kvcache_partition_len} (a "
                                  f"partition is a whole number of KV-cache blocks)")
        if self.prefill_chunk_size > self.max_seq_len or self.max_seq_len % self.prefill_chunk_size:
            raise RBLNConfigError(f"rbln_prefill_chunk_size={self.prefill_chunk_size} must divide "
                                  f"rbln_max_seq_len={self.max_seq_len}")
        if self.decoder_batch_sizes is None:
            self.decoder_batch_sizes = [self.batch_size]
        sizes = self.decoder_batch_sizes
        if not isinstance(sizes, (list, tuple)) or not sizes or any(
                isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= self.batch_size for b in sizes):
            raise RBLNConfigError(f"rbln_decoder_batch_sizes must be integers between 1 and "
                                  f"rbln_batch_size={self.batch_size}, got {sizes!r}")
        self.decoder_batch_sizes = sorted(set(sizes))
        if self.prefill_chunk_sizes is None:
            self.prefill_chunk_sizes = default_prefill_buckets(self.prefill_chunk_size)
        chunks = self.prefill_chunk_sizes
        if not isinstance(chunks, (list, tuple)) or not chunks or any(
                isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= self.prefill_chunk_size
                for c in chunks):
            raise RBLNConfigError(f"rbln_prefill_chunk_sizes must be integers between 1 and "
                                  f"rbln_prefill_chunk_size={self.prefill_chunk_size}, got {chunks!r}")
        if self.prefill_chunk_size not in chunks:
            raise RBLNConfigError(f"rbln_prefill_chunk_sizes={list(chunks)!r} must include "
                                  f"rbln_prefill_chunk_size={self.prefill_chunk_size} (the chunk "
                                  "longer prompts are cut into)")
        self.prefill_chunk_sizes = sorted(set(chunks))
        if self.prefill_chunk_sizes[0] == 1 and 1 in self.decoder_batch_sizes:
            name = "rbln_prefill_chunk_size" if self.prefill_chunk_size == 1 else "rbln_prefill_chunk_sizes"
            raise RBLNConfigError(f"{name}=1 would give a prefill graph the same shape as the "
                                  "batch-1 decode graph; use a chunk of 2 or more")
        return self

    @property
    def block_size(self) -> int:
        """Tokens per KV-cache block (folders compiled before rbln_kvcache_block_size existed
        have blocks of a whole partition)."""
        return self.kvcache_block_size or self.kvcache_partition_len

    @property
    def blocks_per_sequence(self) -> int:
        """KV-cache blocks one sequence of rbln_max_seq_len tokens owns (a block table's
        entries)."""
        return self.max_seq_len // self.block_size

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        for key in self.RUNTIME_ONLY:
            data.pop(key)
        return {"version": CONFIG_VERSION, **data}

    def save(self, folder: Path) -> None:
        (Path(folder) / CONFIG_NAME).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> RBLNConfig:
        path = Path(folder) / CONFIG_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise RBLNConfigError(f"{folder} has no {CONFIG_NAME}: it is not a compiled RBLN model "
                                  "folder (compile with export=True)") from None
        except json.JSONDecodeError as e:
            raise RBLNConfigError(f"{path} is not valid JSON: {e}") from None
        if data.pop("version", None) != CONFIG_VERSION:
            raise RBLNConfigError(f"{path} was written by an incompatible open-rbln version")
        fields = {f.name for f in dataclasses.fields(cls)}
        if "prefill_chunk_sizes" not in data and data.get("decoder_batch_sizes") is not None:
            # compiled before prefill buckets existed: its one prefill graph is the whole chunk
            data["prefill_chunk_sizes"] = [data.get("prefill_chunk_size", cls.prefill_chunk_size)]
        options = cls(**{k: v for k, v in data.items() if k in fields})
        if options.kvcache_block_size is None and options.kvcache_partition_len is not None:
            options.kvcache_block_size = options.kvcache_partition_len  # folder from before the option
        return options

    def prefill_bucket(self, tokens: int) -> int:
        """The compiled prefill chunk a run of `tokens` prompt tokens pads to: the smallest that
        holds them."""
        for size in self.prefill_chunk_sizes or [self.prefill_chunk_size]:
            if size >= tokens:
                return size
        raise InputError(f"a prefill chunk of {tokens} tokens exceeds "
                         f"rbln_prefill_chunk_size={self.prefill_chunk_size}")


def default_prefill_buckets(chunk: int) -> list[int]:
    """The default prefill graphs for a chunk of `chunk` tokens.

    `chunk` and its halves while they stay whole and at least MIN_PREFILL_BUCKET tokens, at most
    PREFILL_BUCKETS of them: a long prompt's last chunk pads by less than half. When the halves
    end below 2 * MIN_PREFILL_BUCKET (no further half would be MIN_PREFILL_BUCKET or more), sizes
    from 2 * SHORT_PREFILL_STEP up to MIN_PREFILL_BUCKET, below the smallest, step by
    SHORT_PREFILL_STEP tokens: prompts that short (a chat turn: 20-60 tokens) are where prefill
    time goes to padding most (a 37-token prompt in a 64-token chunk computes 27 rows for
    nothing; in steps of 16 it pads by at most 15). The steps start at 32, not 16: a graph for
    16 would spare a prompt of 16 tokens or fewer at most 16 rows, for one more compile of the
    model. Measured on SmolLM2 (chunk 128, decode batches 1 and 4): the 37-token prefill 108 ->
    89 ms wall, compile 16.4 s for [64, 128] against 19.7 s for [32, 48, 64, 128] and 20.5 s for
    [16, 32, 48, 64, 128], which ran no faster. A ladder whose halves stop above
    2 * MIN_PREFILL_BUCKET (2048 -> 512) serves long prompts and gets no short steps.
    128 -> [32, 48, 64, 128], 64 -> [32, 48, 64], 96 -> [32, 48, 64, 96], 40 -> [32, 40],
    2048 -> [512, 1024, 2048], 16 -> [16]."""
    sizes = [chunk]
    while (len(sizes) < PREFILL_BUCKETS and sizes[0] % 2 == 0
           and sizes[0] // 2 >= MIN_PREFILL_BUCKET):
        sizes.insert(0, sizes[0] // 2)
    if sizes[0] < 2 * MIN_PREFILL_BUCKET:  # no half of at least MIN_PREFILL_BUCKET left
        below = min(sizes[0] - 1, MIN_PREFILL_BUCKET)
        sizes[:0] = range(2 * SHORT_PREFILL_STEP, below + 1, SHORT_PREFILL_STEP)
    return sizes

"""The base of every `RBLN<Model>`: compile from a Hugging Face model (export=True), save the
compiled folder, load it back (export=False), and create runtimes on the virtual devices.

A compiled folder holds the model's `config.json` (and its tokenizer/generation files when the
source had them), `rbln_config.json` and one `.rbln` artifact per compiled module.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig

import rebel
from rebel import RBLNCompiledModel, Runtime

from .configuration import CONFIG_NAME, RBLNConfig, RBLNConfigError

# Files a compiled folder keeps from the source so tokenizers and generation defaults load from it.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
              "merges.txt", "tokenizer.model", "generation_config.json", "chat_template.jinja")


class RBLNModel:
    """Subclasses set `hf_auto_class` (the transformers class that loads the source model),
    `model_types` (config.model_type values they accept) and implement `_compile` and
    `_artifact_names`."""

    hf_auto_class = None
    model_types: tuple[str, ...] = ()
    is_decoder = True  # compiles a KV cache and prefill/decode graphs

    def __init__(self, config, rbln_config: RBLNConfig, compiled: dict[str, RBLNCompiledModel],
                 folder: Path | None = None):
        self.config = config
        self.rbln_config = rbln_config
        self.compiled_models = compiled
        self._source = folder
        self.runtimes: dict[str, Runtime] = {}
        if rbln_config.create_runtimes:
            self.create_runtimes()

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model_id: str | os.PathLike, export: bool | None = None,
                        rbln_config: dict | None = None, **kwargs):
        """Compile (export=True) a Hugging Face model folder, or load (export=False) a compiled
        one; export=None decides by whether the folder holds rbln_config.json."""
        rbln_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("rbln_")}
        rbln_kwargs.update(rbln_config or {})
        folder = Path(model_id)
        if export is None:
            export = not (folder / CONFIG_NAME).is_file()
        if export:
            return cls._export(model_id, rbln_kwargs, kwargs)
        return cls._load(folder, rbln_kwargs)

    @classmethod
    def _export(cls, model_id, rbln_kwargs: dict, hf_kwargs: dict):
        options = RBLNConfig.from_kwargs(rbln_kwargs)  # unknown options fail before any loading
        config = AutoConfig.from_pretrained(model_id, **_config_kwargs(hf_kwargs))
        cls._check_model_type(config)
        options.model_type = config.model_type
        options.architecture = cls.__name__
        options.finalize(getattr(config, "max_position_embeddings", None), decoder=cls.is_decoder)
        cls._check_config(config, options)
        model = cls.hf_auto_class.from_pretrained(model_id, **hf_kwargs).eval()
        with torch.no_grad():
            compiled = cls._compile(model, options)
        instance = cls(model.config, options, compiled)
        instance._source = Path(model_id) if Path(model_id).is_dir() else None
        return instance

    @classmethod
    def _load(cls, folder: Path, rbln_kwargs: dict):
        options = RBLNConfig.load(folder)
        changed = {k: v for k, v in rbln_kwargs.items()
                   if k.removeprefix("rbln_") not in RBLNConfig.RUNTIME_ONLY}
        if changed:
            raise RBLNConfigError(f"{', '.join(changed)} shape the compiled graphs and cannot change "
                                  f"when loading a compiled folder; recompile with export=True")
        options = RBLNConfig.from_kwargs(rbln_kwargs, base=options)
        if options.architecture and options.architecture != cls.__name__ and \
                options.model_type not in cls.model_types:
            raise RBLNConfigError(f"{folder} was compiled as {options.architecture}, not {cls.__name__}")
        config = AutoConfig.from_pretrained(folder)
        compiled = {name: RBLNCompiledModel.load(folder / f"{name}.rbln")
                    for name in cls._artifact_names(options)}
        return cls(config, options, compiled, folder)

    @classmethod
    def _check_model_type(cls, config) -> None:
        if cls.model_types and config.model_type not in cls.model_types:
            raise RBLNConfigError(f"{cls.__name__} compiles model types {', '.join(cls.model_types)}; "
                                  f"this model is {config.model_type!r}")

    @classmethod
    def _check_config(cls, config, options: RBLNConfig) -> None:
        """Model-specific checks of the options, before any compile work."""

    @classmethod
    def _compile(cls, model, options: RBLNConfig) -> dict[str, RBLNCompiledModel]:
        raise TypeError(f"{cls.__name__} does not define how to compile")

    @classmethod
    def _artifact_names(cls, options: RBLNConfig) -> list[str]:
        return ["model"]

    # --- saving and running ---------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(folder)
        self.rbln_config.save(folder)
        for name, compiled in self.compiled_models.items():
            compiled.save(folder / f"{name}.rbln")
        if self._source is not None and self._source.resolve() != folder.resolve():
            for name in SIDE_FILES:
                if (self._source / name).is_file():
                    shutil.copy2(self._source / name, folder / name)
        return folder

    def create_runtimes(self) -> None:
        device = self.rbln_config.device if self.rbln_config.device is not None else 0
        self.runtimes = {name: Runtime(compiled, tensor_type="pt", device=device)
                         for name, compiled in self.compiled_models.items()}

    def _runtime(self, name: str = "model") -> Runtime:
        if name not in self.runtimes:
            raise rebel.RBLNError(f"{type(self).__name__} has no runtimes: it was created with "
                                  "rbln_create_runtimes=False. Call create_runtimes(), or load the "
                                  "saved folder with from_pretrained(folder, export=False)")
        return self.runtimes[name]

    def __repr__(self) -> str:
        o = self.rbln_config
        where = "no runtimes" if not self.runtimes else ", ".join(
            f"{n} on {', '.join(f'rbln:{d}' for d in r.devices)}" for n, r in self.runtimes.items())
        return (f"{type(self).__name__}(model_type={o.model_type}, npu={next(iter(self.compiled_models.values())).npu}, "
                f"batch_size={o.batch_size}, max_seq_len={o.max_seq_len}, "
                f"tensor_parallel_size={o.tensor_parallel_size}, {where})")


def _config_kwargs(hf_kwargs: dict) -> dict:
    keep = ("gguf_file", "trust_remote_code", "revision", "local_files_only", "cache_dir")
    return {k: v for k, v in hf_kwargs.items() if k in keep}

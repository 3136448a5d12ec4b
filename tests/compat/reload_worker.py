"""A fresh process that reloads compiled vendor models (`export=False`) and runs them.

Why a separate process: a model compiled and run in the same process could lean on state the
compiler left in memory (registered ops, cached programs, live runtimes). This worker never
compiles; it sees only the folder `save_pretrained` wrote, as a user's serving process would.
One worker serves a whole test session (starting Python + torch + transformers + optimum-rbln
costs seconds on 2 cores); each request loads its model anew and frees it afterwards.

Protocol: one JSON request per line on stdin,
    {"cls": "RBLNBertModel", "folder": ..., "inputs": file.pt, "outputs": file.pt,
     "method": "__call__" | "generate" | "decode" | ..., "pick": ["latent_dist.mean", ...],
     "load_kwargs": {...}, "imports": ["cosmos_support", ...]}
("imports": modules of this folder imported before loading: they register classes a saved
pipeline names, e.g. a local safety checker, as a serving process would import its plugins)
and one JSON reply per line on the original stdout ({"ok": true} or {"ok": false, "error": ...});
everything the libraries print goes to stderr, so it cannot corrupt the replies.
"""
from __future__ import annotations

import gc
import importlib
import json
import os
import sys
import traceback

import torch


def tensors_of(value, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a model's output, keyed by attribute/key/index path ("" for a bare one)."""
    import numpy as np
    if isinstance(value, torch.Tensor):
        return {prefix: value.detach().clone()}
    if isinstance(value, np.ndarray):
        return {prefix: torch.from_numpy(value.copy())}
    out: dict[str, torch.Tensor] = {}
    if isinstance(value, dict) or hasattr(value, "items"):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(value)]
    else:
        return out
    for key, item in items:
        out.update(tensors_of(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _attr(value, path: str):
    for name in path.split("."):
        value = getattr(value, name)
    return value


def handle(request: dict) -> dict:
    import optimum.rbln
    from rebel.device.memory import reset_memory

    for name in request.get("imports", []):
        importlib.import_module(name)
    cls = getattr(optimum.rbln, request["cls"])
    model = cls.from_pretrained(request["folder"], export=False, **request.get("load_kwargs", {}))
    try:
        inputs = torch.load(request["inputs"], weights_only=False)
        call = getattr(model, request.get("method", "__call__"))
        if "generator_seed" in inputs:  # pipelines draw their noise from a generator
            inputs["kwargs"]["generator"] = torch.Generator().manual_seed(inputs.pop("generator_seed"))
        with torch.no_grad():
            result = call(*inputs.get("args", ()), **inputs.get("kwargs", {}))
        if request.get("pick"):  # attributes that are not plain tensors (a latent distribution)
            result = {path: _attr(result, path) for path in request["pick"]}
        outputs = tensors_of(result)
        torch.save(outputs, request["outputs"])
        return {"keys": sorted(outputs)}
    finally:
        del model
        gc.collect()
        reset_memory()


def main() -> None:
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library prints go to stderr
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = {"ok": True, **handle(json.loads(line))}
        except Exception as e:  # reported to the test, which fails with it
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"[:4000],
                     "traceback": traceback.format_exc()[-8000:]}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()

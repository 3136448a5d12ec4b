"""Peak RAM of loading SmolLM2's compiled folder, against the bytes of its weights.

A loader that reads the artifact and then copies its weights holds them twice at the peak; ours
reads the safetensors member into one buffer the tensors view (issue 11, item 5). Each figure
is measured in a fresh Python process, so nothing loaded before counts:

- `VmHWM` (the kernel's peak resident set, /proc/self/status) before and after
  `RBLNLlamaForCausalLM.from_pretrained(folder)`, and after the first generated token (the
  runtime is created then and binds the weights to its device memory).

What to expect: the artifact's 16-bit weights once (the load), then the runtime's device
storage. The emulated device holds a weight that decode's linears read in its 16-bit format
(rebel.device.packed_linear), and when nothing else reads it the runtime takes the artifact's
tensor as it is, so those weights cost nothing more. Every other weight is held as FP32 storage
of its 16-bit values (kernels compute in FP32 and round to 16 bits), 2x its 16-bit bytes, plus a
packed copy where a linear and another op both read it. KV caches (zero buffers) are not stored in the artifact, load as one broadcast zero,
and get device storage from calloc: the OS maps their pages when a block is first written, so
an idle cache costs no resident memory.

The compiled folder is the one `make demo` caches (compiled here if missing).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))

MEASURE = r"""
import json, sys
import torch
from optimum.rbln import RBLNLlamaForCausalLM

def hwm(field="VmHWM:"):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
before = hwm()
model = RBLNLlamaForCausalLM.from_pretrained(sys.argv[1])
loaded = hwm()
model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=1, do_sample=False)
print(json.dumps({"before": before, "loaded": loaded, "first_token": hwm(), "held": hwm("VmRSS:")}))
"""


def artifact_bytes(folder: Path) -> tuple[int, int, set[str]]:
    """(bytes of the stored weights, 16-bit bytes of the zero buffers made at load, their names)."""
    from rebel.compiler.artifact import load_artifact
    with zipfile.ZipFile(folder / "model.rbln") as z:
        zeros = set(json.loads(z.read("manifest.json")).get("zero_buffers", []))
    weights = load_artifact(folder / "model.rbln").weights
    stored = sum(t.numel() * t.element_size() for n, t in weights.items() if n not in zeros)
    made = sum(t.numel() * t.element_size() for n, t in weights.items() if n in zeros)
    return stored, made, zeros


def packed_head_bytes(folder: Path) -> int:
    """Bytes of the packed copies a runtime holds beside a plain FP32 one (a weight some other op
    reads too): FP32 for oneDNN's, 16-bit for the others."""
    from rebel.compiler.artifact import load_artifact
    from rebel.device import packed_linear
    programs = load_artifact(folder / "model.rbln").buckets
    packed = packed_linear.packed_weights(programs)
    both = packed_linear.plain_readers(programs, packed)
    size = {packed_linear.ONEDNN: 4, packed_linear.SIXTEEN_BIT: 2}
    return sum(size[packed[n]] * math.prod(programs[0].weights[n].shape) for n in both)


def fp32_bytes(folder: Path, zeros: set[str]) -> int:
    """Bytes of the FP32 storage a runtime gives the stored weights it does not hold in 16 bits
    only (zeros: the zero buffers, whose storage is mapped lazily)."""
    from rebel.compiler.artifact import load_artifact
    from rebel.device import packed_linear
    from rebel.runtime.executor import sixteen_bit_only
    programs = load_artifact(folder / "model.rbln").buckets
    only = sixteen_bit_only(programs, packed_linear.packed_weights(programs))
    weights = programs[0].weights
    return sum(4 * math.prod(spec.shape) for n, spec in weights.items()
               if n not in only and n not in zeros and "float" in spec.dtype)


def main() -> None:
    from demo import compiled_smollm2  # the compiled folder `make demo` caches
    model, _, how = compiled_smollm2()
    folder = Path(model._source)
    del model
    out = subprocess.run([sys.executable, "-c", MEASURE, str(folder)], check=True,
                         capture_output=True, text=True).stdout
    m = json.loads(out.strip().splitlines()[-1])
    weights, zeros, zero_names = artifact_bytes(folder)
    mib = 2 ** 20
    print(f"SmolLM2-135M compiled folder ({how}): {folder}")
    print(f"weights stored in the artifact (16-bit)   {weights / mib:8.1f} MiB")
    print(f"KV caches made at load (16-bit)           {zeros / mib:8.1f} MiB")
    load = m["loaded"] - m["before"]
    first = m["first_token"] - m["before"]
    packed = packed_head_bytes(folder)
    plain = fp32_bytes(folder, zero_names)
    expected = weights + plain + packed
    print(f"peak RSS growth, from_pretrained          {load / mib:8.1f} MiB  ({load / weights:.2f}x the weights)")
    print(f"peak RSS growth, + first token            {first / mib:8.1f} MiB  ({first / weights:.2f}x the weights)")
    print(f"  expected: the 16-bit weights (decode's linears held as they are) + FP32 storage of the "
          f"others ({plain / mib:.1f} MiB) + packed copies beside a plain one ({packed / mib:.1f} MiB) "
          f"= {expected / mib:.1f} MiB, plus the cache blocks written")
    held = m["held"] - m["before"]
    print(f"RSS held after the first token            {held / mib:8.1f} MiB  ({held / weights:.2f}x the weights; "
          f"the cache blocks written included)")

if __name__ == "__main__":
    main()

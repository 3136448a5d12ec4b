"""rebel.plan and rbln-plan: capacity plans from a config.json alone (meta tensors, no weights).

Tiny configs keep these fast; one slow test plans the Llama-3-8B and Qwen3-32B configs of
examples/configs as docs/planning.md does."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rebel.cli.plan import main
from rebel.errors import PlanError
from rebel.npu import load_spec
from rebel.npu.spec import GiB, MiB
from rebel.plan import Planner, Predictor, plan, read_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"

TINY = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256,
        "max_position_embeddings": 4096, "tie_word_embeddings": False}


def write(tmp_path: Path, table: dict, name: str = "tiny") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(table))
    return folder


@pytest.fixture
def tiny(tmp_path):
    return write(tmp_path, TINY)


@pytest.fixture
def small_die(tmp_path):
    """A one-die product with 384 MiB of DRAM (96 MiB usable after the 288 MiB reservation)."""
    path = tmp_path / "small.toml"
    path.write_text('base = "RBLN-CA12"\nname = "SMALL-1"\n[die.memory]\ndram_gib = 0.375\n')
    return str(path)


# A model whose untied 98304-token embedding and LM head (48 MiB each) miss 96 MiB at TP=1 and
# fit at TP=2 (the LM head splits, the embedding stays whole).
WIDE_VOCAB = {**TINY, "hidden_size": 256, "num_hidden_layers": 2, "num_key_value_heads": 4,
              "intermediate_size": 1024, "vocab_size": 98304}


# ---- config errors -------------------------------------------------------------------------

@pytest.mark.parametrize("table, message", [
    ({**TINY, "model_type": "gpt2"}, "model_type 'gpt2'"),
    ({**TINY, "model_type": "phimoe"}, "model_type 'phimoe'"),
    ({k: v for k, v in TINY.items() if k != "model_type"}, "no 'model_type'"),
    ({k: v for k, v in TINY.items() if k != "intermediate_size"}, "lacks intermediate_size"),
    ({**TINY, "num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
    ({**TINY, "num_key_value_heads": 3}, "not a multiple of 3 KV heads"),
])
def test_bad_config_is_a_clear_error(tmp_path, table, message):
    with pytest.raises(PlanError, match=message):
        read_config(write(tmp_path, table))


def test_missing_and_unreadable_config(tmp_path):
    with pytest.raises(PlanError, match="no Hugging Face config"):
        read_config(tmp_path / "nothing")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="not a readable JSON config"):
        read_config(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(PlanError, match="JSON object"):
        read_config(tmp_path)


def test_tp_must_divide_heads(tiny):
    with pytest.raises(PlanError, match="TP=4 must divide"):
        Predictor(tiny, tp=4)


# ---- fits / does not fit --------------------------------------------------------------------

def test_tiny_plan_fits_with_kv_blocks_left(tiny):
    p = plan(tiny, tp=2, batch=[1, 4], prompt_len=100, output_len=20)
    m = p.memory
    spec = load_spec("RBLN-CA25")
    assert p.fits and p.over_bytes == 0
    assert m.usable == spec.die.memory.dram_usable_bytes
    # one 1024-token block per sequence; each block holds every layer's K and V for the die's
    # share of the KV heads (2 heads / TP 2 = 1 head of dim 16)
    assert p.blocks_per_seq == 1 and p.kv_blocks_needed == 4
    assert m.kv_block == 4 * 2 * 1 * 1024 * 16 * 2
    assert p.kv_blocks_left == m.kv_blocks_total - 4
    free = m.usable - m.weights - m.activations
    assert m.kv_blocks_total * m.kv_block <= free < (m.kv_blocks_total + 1) * m.kv_block
    assert 0 < p.ttft_s and [d.batch for d in p.decode] == [1, 4]
    assert p.watts == 350.0 == spec.power_w  # the card's TDP, from the spec file
    d4 = p.decode[1]
    assert d4.tokens_per_s == pytest.approx(p.replicas * 4 / d4.tpot_s)
    assert d4.tokens_per_joule == pytest.approx(d4.serving_tokens_per_s / p.watts)
    assert p.replicas == 2  # TP=2 on a 4-die card: two copies
    assert "fits" in repr(p) and "KV blocks of 1024 tokens left" in repr(p)


def test_does_not_fit_says_by_how_much_and_min_cards(tmp_path, small_die):
    planner = Planner(write(tmp_path, WIDE_VOCAB), small_die)
    p = planner.plan(1, 1, prompt_len=64, output_len=16)
    m = p.memory
    assert not p.fits
    assert p.over_bytes == m.weights + m.activations + m.kv_block - m.usable > 0
    assert f"{p.over_bytes / GiB:.2f} GiB over per die" in repr(p)
    best = planner.min_cards(prompt_len=64, output_len=16)
    assert (best.tp, best.cards) == (2, 2) and best.fits
    assert best.memory.weights < m.weights
    with pytest.raises(PlanError, match=r"does not fit on 1 x SMALL-1 at any TP: at TP=1 it is "
                                        r"\d+\.\d\d GiB over per die"):
        planner.min_cards(prompt_len=64, output_len=16, max_cards=1)


def test_spec_without_power_is_refused(tmp_path, tiny):
    spec = load_spec("RBLN-CA25")
    import dataclasses
    with pytest.raises(PlanError, match="power_w"):
        Planner(tiny, dataclasses.replace(spec, power_w=None))


# ---- extrapolation ----------------------------------------------------------------------------

def test_extrapolation_matches_exact_compile(tmp_path):
    config = write(tmp_path, {**TINY, "hidden_size": 128, "intermediate_size": 256,
                              "vocab_size": 512})
    kw = dict(tp=2, chunk=32, batches=(1, 4), max_seq_len=256, block_size=64)
    fast, exact = Predictor(config, **kw), Predictor(config, exact=True, **kw)
    assert fast.layer_counts == (1, 2) and exact.layer_counts == (4,)
    pairs = [(fast.ttft(100), exact.ttft(100)),
             (fast.decode_step(1, 120), exact.decode_step(1, 120)),
             (fast.decode_step(3, 200), exact.decode_step(3, 200)),
             (fast.tpot(4, 100, 20), exact.tpot(4, 100, 20))]
    for a, b in pairs:
        assert a.seconds == pytest.approx(b.seconds, rel=0.01)
        assert a.breakdown.compute_s == pytest.approx(b.breakdown.compute_s, rel=0.01)
    fm, em = fast.memory(), exact.memory()
    assert fm.weights == pytest.approx(em.weights, rel=0.01)
    assert fm.kv_block == em.kv_block
    # a longer context reads more KV blocks (the tiny step is launch-bound: look at its KV DMA)
    assert exact.decode_step(4, 256).breakdown.kv_dma_s > exact.decode_step(4, 64).breakdown.kv_dma_s


def test_step_cost_for_the_serving_simulation(tiny):
    from rebel.plan.serving import step_seconds

    pred = Predictor(tiny, tp=1, chunk=32, batches=(1, 4), max_seq_len=256, block_size=64)
    cost = pred.step_cost()
    assert (cost.chunk, cost.decode_batch) == (32, 4)
    # one request prefilling 40 tokens from position 10 (two chunks), five decoding (two calls)
    scheduled = [(40, 10), *((1, p) for p in (70, 80, 90, 100, 200))]
    expected = (pred.prefill_chunk(10, 32).seconds + pred.prefill_chunk(42, 8).seconds
                + pred.decode_at([70, 80, 90, 100]).seconds + pred.decode_at([200]).seconds)
    assert step_seconds(cost, scheduled) == pytest.approx(expected)
    assert pred.decode_at([63, 63]).seconds == pred.decode_step(2, 64).seconds
    with pytest.raises(PlanError, match="exceeds max_seq_len"):
        pred.decode_at([300])


# ---- search -------------------------------------------------------------------------------------

def test_search_meets_slos_sorted_by_cost(tiny):
    planner = Planner(tiny)
    calls = []
    r = planner.search(rps=200, ttft_ms=20, tpot_ms=5, prompt_len=128, output_len=32,
                       batches=(1, 4, 16), max_cards=1, progress=lambda *a: calls.append(a))
    assert r.deployments
    assert calls[0][1:] == (0, 2) and calls[-1] == ("done", 2, 2)  # TP 1 and 2 on one card
    for d in r.deployments:
        assert d.ttft_s <= 0.020 and d.tpot_s <= 0.005
        assert d.running <= d.batch and d.prefill_utilization < 1
        assert d.cards == planner.cards_for(d.tp, d.replicas)
        assert d.watts == d.cards * 350.0
        assert d.tokens_per_s == pytest.approx(200 * 32)
    costs = [d.cards for d in r.deployments]
    assert costs == sorted(costs)
    # more load needs at least as many cards
    heavier = planner.search(rps=2000, ttft_ms=20, tpot_ms=5, prompt_len=128, output_len=32,
                             batches=(1, 4, 16), max_cards=1)
    if heavier.deployments:
        assert heavier.deployments[0].cards >= r.deployments[0].cards
    none = planner.search(rps=200, ttft_ms=20, tpot_ms=1e-4, prompt_len=128, output_len=32,
                          batches=(1, 4, 16), max_cards=1)
    assert none.deployments == [] and any("misses the SLOs" in n for n in none.notes)


def test_slot_wait_is_erlang_c():
    from rebel.plan.planner import _slot_wait

    # one slot: M/M/1, wait = rho / (1 - rho) x service
    assert _slot_wait(1, 0.5, 2.0) == pytest.approx(2.0)
    assert _slot_wait(64, 29.2, 11.7) < 1e-3 < _slot_wait(32, 29.2, 11.7)
    assert _slot_wait(8, 8.0, 1.0) == float("inf")


# ---- CLI ------------------------------------------------------------------------------------------

def test_cli_json_plan(tiny, capsys):
    code = main([str(tiny), "--tp", "2", "--batch", "1", "8", "--prompt-len", "64",
                 "--output-len", "8", "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    d = json.loads(out)
    assert d["fits"] is True and d["tp"] == 2 and d["hardware"] == "RBLN-CA25"
    assert [p["batch"] for p in d["decode"]] == [1, 8]
    assert d["kv_blocks_left"] == d["memory"]["kv_blocks_total"] - 8
    assert d["prefill"]["bottleneck"] in d["prefill"]
    assert d["watts"] == 350.0


def test_cli_table_and_search_json(tiny, capsys):
    assert main([str(tiny), "--tp", "1", "--prompt-len", "64", "--output-len", "8"]) == 0
    out = capsys.readouterr().out
    assert "DRAM per die" in out and "TTFT" in out and "tok/J" in out and "350 W" in out
    code = main([str(tiny), "--search", "--rps", "50", "--ttft-ms", "50", "--tpot-ms", "10",
                 "--prompt-len", "64", "--output-len", "8", "--batch", "1", "4", "--cards", "1",
                 "--json"])
    out = capsys.readouterr().out
    assert code == 0
    d = json.loads(out)
    assert d["rps"] == 50 and d["deployments"]
    assert all(x["tpot_s"] <= 0.010 for x in d["deployments"])


def test_cli_plan_that_misses_says_how_many_cards(tmp_path, small_die, capsys):
    config = str(write(tmp_path, WIDE_VOCAB))
    argv = [config, "--hardware", small_die, "--tp", "1", "--prompt-len", "64", "--output-len", "16"]
    assert main([*argv, "--json"]) == 1  # does not fit: exit status 1
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] is False and d["over_bytes"] > 0
    assert d["fewest_cards"]["cards"] == 2 and d["fewest_cards"]["tp"] == 2
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "GiB over" in out and "It fits on 2 card(s) at TP=2" in out


def test_cli_errors_are_one_line(tmp_path, capsys):
    code = main([str(write(tmp_path, {**TINY, "model_type": "gpt2"})), "--json"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("rbln-plan: error:") and "'gpt2'" in err
    assert err.count("\n") == 1
    assert main([str(tmp_path / "missing")]) == 2


# ---- the documented example (slow) ----------------------------------------------------------

@pytest.mark.slow
def test_llama3_8b_and_qwen3_32b_on_atom_max():
    p = plan(EXAMPLES / "llama-3-8b", tp=4, batch=1, prompt_len=1024, output_len=256)
    assert p.fits and p.cards == 1
    assert 4.3 * GiB < p.memory.weights < 4.6 * GiB
    assert p.memory.kv_block == 32 * 2 * 2 * 1024 * 128 * 2 == 32 * MiB
    assert p.kv_blocks_left > 300
    assert 0.15 < p.ttft_s < 0.20 and 0.015 < p.decode[0].tpot_s < 0.018
    qwen = Planner(EXAMPLES / "qwen3-32b")
    at4 = qwen.plan(4, 1)
    assert not at4.fits and 0.3 * GiB < at4.over_bytes < 1.2 * GiB
    best = qwen.min_cards()
    assert best.fits and (best.tp, best.cards) == (8, 2)


def test_weight_only_quantized_plans(tiny):
    """--weights int8 / int4: the linears' stored bytes shrink (DRAM and weight DMA follow) and
    a weight-bound decode step gets faster; the LM head stays 16-bit."""
    wide = {**TINY, "hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
            "num_key_value_heads": 4}
    folder = tiny.parent / "wide"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(wide))
    plans = {w: Planner(folder, weights=w).plan(tp=1, batch=[1], prompt_len=64, output_len=8)
             for w in (None, "int8", "int4")}
    fp16, int8, int4 = (plans[w].memory.weights for w in (None, "int8", "int4"))
    assert int4 < int8 < 0.7 * fp16
    assert plans["int8"].decode[0].tpot_s < plans[None].decode[0].tpot_s
    assert plans["int8"].dtype == "float16 (int8 weights)"
    with pytest.raises(PlanError, match="weights 'int3'"):
        Planner(folder, weights="int3").plan(tp=1)

"""rebel.plan.encoder and rbln-plan on encoder configs (meta tensors, no weights): predictions
equal a direct compile of the same module, 1-and-2-layer extrapolation agrees with every layer,
rates and per-joule figures follow the latencies, the search meets its SLO, and a config whose
graph the compiler cannot lower is a PlanError naming the op and the model type."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import rebel
from rebel.cli.plan import main
from rebel.errors import PlanError
from rebel.npu import load_spec
from rebel.plan.encoder import (EncoderPlanner, EncoderPredictor, build_meta_encoder,
                                encoder_inputs)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"
BERT = {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 128}
TINY = {
    "bert": BERT,
    "roberta": {**BERT, "model_type": "roberta", "max_position_embeddings": 130},
    "xlm-roberta": {**BERT, "model_type": "xlm-roberta", "max_position_embeddings": 130},
    "distilbert": {"model_type": "distilbert", "dim": 64, "n_layers": 3, "n_heads": 4,
                   "hidden_dim": 128, "vocab_size": 100, "max_position_embeddings": 128},
    "t5": {"model_type": "t5", "d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4,
           "num_layers": 3, "vocab_size": 100},
}


def write(tmp_path: Path, table: dict, name: str = "enc") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(table))
    return folder


def test_exact_prediction_equals_compiling_the_module_directly():
    pred = EncoderPredictor(BERT, "RBLN-CA25", batches=(2,), seq_lens=(32,), exact=True)
    model = build_meta_encoder(BERT)
    compiled = rebel.compile_from_torch(model, encoder_inputs(model, 2, 32), npu="RBLN-CA25")
    assert compiled.is_meta
    assert pred.call(2, 32).seconds == pytest.approx(compiled.predicted_latency_s(), rel=1e-9)
    assert pred.memory().weights == compiled.program.weight_bytes


def test_one_and_two_layers_extrapolate_to_every_layer():
    kw = dict(batches=(1, 4), seq_lens=(64,))
    fast, exact = EncoderPredictor(BERT, **kw), EncoderPredictor(BERT, exact=True, **kw)
    assert fast.layer_counts == (1, 2) and exact.layer_counts == (4,)
    for b in (1, 4):
        f, e = fast.call(b, 64), exact.call(b, 64)
        assert f.seconds == pytest.approx(e.seconds, rel=0.01)
        assert f.breakdown.compute_s == pytest.approx(e.breakdown.compute_s, rel=0.01)
    assert fast.memory().weights == pytest.approx(exact.memory().weights, rel=0.001)


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_each_tested_encoder_plans(model_type):
    p = EncoderPlanner(TINY[model_type]).plan(1, [1, 8], [16, 64])
    assert p.fits and p.model_type == model_type
    assert p.model_class == {"t5": "T5EncoderModel"}.get(model_type, p.model_class)
    lat = {(q.batch, q.seq_len): q.latency_s for q in p.points}
    assert lat[(8, 64)] > lat[(1, 64)] > 0 and lat[(1, 64)] >= lat[(1, 16)]
    assert all(q.bottleneck in q.breakdown.NAMES.values() for q in p.points)


def test_rates_and_energy_follow_the_latency():
    spec = load_spec("RBLN-CA25")
    p = EncoderPlanner(BERT).plan(1, [1, 4], [32], cards=2)
    assert p.replicas == 2 * spec.dies and p.watts == 2 * spec.power_w
    for q in p.points:
        assert q.sequences_per_s == pytest.approx(p.replicas * q.batch / q.latency_s)
        assert q.tokens_per_s == pytest.approx(q.sequences_per_s * q.seq_len)
        assert q.tokens_per_joule == pytest.approx(q.tokens_per_s / p.watts)
        assert q.sequences_per_joule == pytest.approx(q.sequences_per_s / p.watts)


def test_search_meets_the_slo_and_costs_more_at_higher_rates():
    planner = EncoderPlanner(BERT)
    call = planner.predictor(1, (1, 2, 4, 8), (64,)).call(1, 64).seconds
    slo_ms = 4 * call * 1e3
    low = planner.search(rps=0.5 / call, latency_ms=slo_ms, seq_len=64, batches=(1, 2, 4, 8),
                         max_cards=2)
    high = planner.search(rps=12 / call, latency_ms=slo_ms, seq_len=64, batches=(1, 2, 4, 8),
                          max_cards=2)
    assert low.deployments and high.deployments
    best_low, best_high = low.deployments[0], high.deployments[0]
    for d in (*low.deployments, *high.deployments):
        assert d.latency_s <= slo_ms / 1e3 and 0 < d.utilization < 1
    assert best_low.replicas * best_low.tp <= best_high.replicas * best_high.tp
    pred = planner.predictor(1, (1, 2, 4, 8), (64,))
    for result in (low, high):
        for d in result.deployments:  # the replicas keep up: utilization is what the batches serve
            step = planner.predictor(d.tp, (1, 2, 4, 8), (64,)).call(d.batch, 64).seconds
            assert d.utilization == pytest.approx(result.rps / d.replicas * step / d.batch)
    # a batch of 1 serves 1 / call per replica: 12 of them need more than one die or batching
    assert best_high.batch > 1 or best_high.replicas * best_high.tp >= 12
    assert pred.call(8, 64).seconds / 8 < call
    none = planner.search(rps=1e9, latency_ms=slo_ms, seq_len=64, batches=(1,), max_cards=1)
    assert not none.deployments and none.notes


def test_bert_large_example():
    p = EncoderPlanner(EXAMPLES / "bert-large", "RBLN-CA25").plan(1, [1, 8], [384])
    assert p.fits and p.model == "bert-large"
    one, eight = p.points
    # ~0.3 G linear weights x 384 tokens x 2 FLOP at 32 TFLOPS: about 7.5 ms of compute per sequence
    assert 7e-3 < one.latency_s < 15e-3 and 7 * one.latency_s < eight.latency_s < 9 * one.latency_s
    assert one.bottleneck == "compute"
    assert 0.55 * 2**30 < p.memory.weights < 0.7 * 2**30  # 335M params in FP16


@pytest.mark.parametrize("table, message", [
    ({**BERT, "model_type": "longformer"}, "--allow-untested"),
    ({**BERT, "model_type": "gpt2"}, "model_type 'gpt2'"),
])
def test_unplanned_model_types_are_refused_by_name(tmp_path, capsys, table, message):
    assert main([str(write(tmp_path, table))]) == 2
    assert message in capsys.readouterr().err


def test_plan_errors():
    with pytest.raises(PlanError, match="exceeds the model's max_position_embeddings 128"):
        EncoderPredictor(BERT, seq_lens=(256,))
    with pytest.raises(PlanError, match="TP=3"):
        EncoderPlanner(BERT).plan(3)
    with pytest.raises(PlanError, match="outside the buckets"):
        EncoderPredictor(BERT, batches=(1,), seq_lens=(16,)).call(2, 16)
    with pytest.raises(PlanError, match="not a tested encoder"):
        EncoderPlanner({**BERT, "model_type": "longformer"})


def test_cli_json(tmp_path, capsys):
    folder = write(tmp_path, BERT)
    assert main([str(folder), "--seq-len", "32", "--batch", "1", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "encoder" and out["fits"] and len(out["points"]) == 2
    assert out["points"][1]["latency_s"] > out["points"][0]["latency_s"]
    assert main([str(folder), "--seq-len", "32", "--search", "--rps", "50", "--latency-ms", "20",
                 "--cards", "1", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["deployments"] and all(d["latency_s"] <= 0.02 for d in found["deployments"])
    assert main([str(folder), "--seq-len", "32"]) == 0
    assert "tok/J" in capsys.readouterr().out


# Longformer (allenai/longformer-base-4096's shape, 2 layers): its attention asks
# `is_index_global_attn.flatten().any().item()` and branches on it, which no static graph holds.
LONGFORMER = {"model_type": "longformer", "hidden_size": 768, "num_hidden_layers": 2,
              "num_attention_heads": 12, "intermediate_size": 3072, "vocab_size": 50265,
              "attention_window": [512, 512], "max_position_embeddings": 4098, "pad_token_id": 1,
              "type_vocab_size": 1}


def test_a_graph_the_compiler_cannot_lower_names_the_op_and_model_type(tmp_path, capsys):
    planner = EncoderPlanner(LONGFORMER, allow_untested=True)
    with pytest.raises(PlanError) as err:
        planner.plan(1, [1], [512])
    text = str(err.value)
    assert "model_type 'longformer'" in text and "LongformerModel" in text
    assert "aten._local_scalar_dense" in text and "modeling_longformer.py:" in text
    assert "if is_global_attn" in text
    folder = write(tmp_path, LONGFORMER)
    assert main([str(folder), "--allow-untested", "--seq-len", "512"]) == 2
    err_text = capsys.readouterr().err
    assert "aten._local_scalar_dense" in err_text and "longformer" in err_text
    assert "def forward" not in err_text  # torch.export's partial-graph dump stays off the console

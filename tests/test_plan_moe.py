"""Mixture-of-experts decoders in rebel.plan: grouped expert GEMMs (rebel.device.moe) whose
weights split over dies like a dense MLP's, whose weight traffic is each chosen expert once,
and plans of MoE configs (Qwen3-MoE, Mixtral, Qwen2-MoE) from a config alone."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import rebel
from rebel.cli.plan import main
from rebel.compiler.tensor_parallel import ALL_REDUCE
from rebel.device import moe
from rebel.errors import PlanError
from rebel.plan import Planner, Predictor, read_config
from rebel.plan.model import shape_of
from rebel.plan.moe import use_grouped_experts

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"
H, E, K, INTER = 64, 16, 4, 32

TINY_MOE = {"model_type": "qwen3_moe", "hidden_size": H, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "intermediate_size": 128, "moe_intermediate_size": INTER, "num_experts": E,
            "num_experts_per_tok": K, "norm_topk_prob": True, "vocab_size": 256,
            "max_position_embeddings": 4096, "tie_word_embeddings": False}
TINY_MIXTRAL = {"model_type": "mixtral", "hidden_size": H, "num_hidden_layers": 4,
                "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": INTER,
                "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 256,
                "max_position_embeddings": 4096, "tie_word_embeddings": False}
TINY_QWEN2_MOE = {**TINY_MOE, "model_type": "qwen2_moe", "shared_expert_intermediate_size": 48}


def write(tmp_path: Path, table: dict, name: str = "tiny_moe") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(table))
    return folder


class MoeBlock(torch.nn.Module):
    """transformers' own Qwen3-MoE sparse block (router + experts) on [1, T, H]."""

    def __init__(self, grouped: bool):
        super().__init__()
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        config = Qwen3MoeConfig(**{k: v for k, v in TINY_MOE.items() if k != "model_type"})
        torch.manual_seed(0)
        self.block = Qwen3MoeSparseMoeBlock(config)
        for p in self.block.parameters():
            torch.nn.init.normal_(p, std=0.2)
        if grouped:
            use_grouped_experts(self.block)

    def forward(self, x):
        return self.block(x)


@pytest.fixture(scope="module")
def blocks():
    eager = MoeBlock(grouped=False).eval()
    grouped = copy.deepcopy(eager)
    use_grouped_experts(grouped.block)
    return eager, grouped


def tokens(t: int) -> torch.Tensor:
    return torch.randn(1, t, H, generator=torch.Generator().manual_seed(t))


def expert_bytes(experts: int, tp: int = 1) -> int:
    """FP16 bytes of `experts` experts' gate, up and down weights on one die."""
    return experts * 3 * INTER * H * 2 // tp


# ---- the grouped ops ---------------------------------------------------------------------------

def test_grouped_ops_equal_transformers_eager_experts(blocks):
    eager, grouped = blocks
    x = tokens(24)
    with torch.no_grad():
        assert torch.allclose(grouped(x), eager(x), rtol=1e-5, atol=1e-5)


def test_grouped_ops_check_their_operands():
    x, ids = torch.randn(3, H), torch.zeros(3, 2, dtype=torch.long)
    w = torch.randn(E, INTER, H)
    with pytest.raises(ValueError, match="activation 'swish'"):
        moe.gate_up_reference(x, ids, w, w, "swish")
    with pytest.raises(ValueError, match="must agree"):
        moe.gate_up_reference(x, ids[:2], w, w)
    with pytest.raises(ValueError, match=r"\[E, out, 64\]"):
        moe.gate_up_reference(x, ids, w.transpose(1, 2), w)
    assert moe.active_experts(1, 8, 128) == 8 and moe.active_experts(128, 8, 128) == 128


# ---- tensor parallelism ------------------------------------------------------------------------

@pytest.mark.parametrize("t", [1, 8])
def test_tp_split_moe_matches_tp1_and_fp32(blocks, t):
    eager, grouped = blocks
    x = tokens(t)
    with torch.no_grad():
        reference = eager(x)
    out = {tp: rebel.Runtime(rebel.compile_from_torch(grouped, example_inputs=[x],
                                                      tensor_parallel_size=tp)).run(x)
           for tp in (1, 2, 4)}
    scale = reference.abs().max().item()
    for tp, y in out.items():
        assert (y - reference).abs().max().item() < 1e-2 * scale, tp
    for tp in (2, 4):
        assert (out[tp] - out[1]).abs().max().item() < 5e-3 * scale, tp


def test_moe_artifact_round_trip(blocks, tmp_path):
    _, grouped = blocks
    x = tokens(8)
    compiled = rebel.compile_from_torch(grouped, example_inputs=[x], tensor_parallel_size=2)
    path = compiled.save(tmp_path / "moe.rbln")
    assert torch.equal(rebel.Runtime(str(path)).run(x), rebel.Runtime(compiled).run(x))


def test_tp_splits_every_expert_along_its_intermediate_dim(blocks):
    _, grouped = blocks
    x = tokens(8)
    programs = {tp: rebel.compile_from_torch(grouped, example_inputs=[x],
                                             tensor_parallel_size=tp).program for tp in (1, 2, 4)}
    one = programs[1].weight_bytes
    assert one == expert_bytes(E) + E * H * 2  # the experts and the router, nothing copied
    for tp in (2, 4):
        p = programs[tp]
        assert p.weight_bytes == one // tp  # each die: 1/tp of every expert (and of the router)
        dims = {}
        for k in p.kernels:
            for op in k.ops:
                if op.target == moe.GATE_UP:
                    dims["gate"], dims["up"] = (p.sharding.weights.get(a.name) for a in op.args[2:4])
                elif op.target == moe.DOWN:
                    dims["down"] = p.sharding.weights.get(op.args[3].name)
        assert dims == {"gate": 1, "up": 1, "down": 2}  # column parallel / row parallel along I
        collectives = [k.ops[0].target for k in p.kernels if k.kind == "collective"]
        assert collectives.count(ALL_REDUCE) == 1  # after moe_down, as after a dense down_proj


# ---- weight traffic ----------------------------------------------------------------------------

def moe_weight_bytes(program) -> int:
    """Task DMA bytes of expert weights the MoE kernels of a program move."""
    return sum(t.nbytes for k in program.kernels if any(o.target in moe.TARGETS for o in k.ops)
               for t in k.plan.dma_in if t.weight)


@pytest.mark.parametrize("t, experts", [(1, K), (2, 2 * K), (128, E)])
def test_weight_traffic_is_each_chosen_expert_once(blocks, t, experts):
    """Decode reads the k * b experts its tokens chose (at most E); a prefill chunk reads each
    of the E experts once, not one copy per (token, expert) pair."""
    _, grouped = blocks
    for tp in (1, 2):
        p = rebel.compile_from_torch(grouped, example_inputs=[tokens(t)],
                                     tensor_parallel_size=tp).program
        assert moe_weight_bytes(p) == expert_bytes(experts, tp)


def test_prefill_flops_are_the_routed_pairs(blocks):
    _, grouped = blocks
    p = rebel.compile_from_torch(grouped, example_inputs=[tokens(128)]).program
    flops = sum(k.plan.flops for k in p.kernels if any(o.target in moe.TARGETS for o in k.ops))
    assert flops == pytest.approx(2 * 128 * K * 3 * INTER * H)  # k experts per token, not E


# ---- configs and plans -------------------------------------------------------------------------

@pytest.mark.parametrize("table, message", [
    ({k: v for k, v in TINY_MOE.items() if k != "num_experts_per_tok"}, "lacks num_experts_per_tok"),
    ({**TINY_MOE, "num_experts_per_tok": 32}, "exceeds the 16 experts"),
    ({**TINY_MOE, "num_experts": 0}, "num_experts must be a positive integer"),
    ({**TINY_MOE, "mlp_only_layers": [0]}, "mixes dense and MoE layers"),
    ({k: v for k, v in TINY_QWEN2_MOE.items() if k != "shared_expert_intermediate_size"},
     "lacks shared_expert_intermediate_size"),
])
def test_bad_moe_config_is_a_clear_error(tmp_path, table, message):
    with pytest.raises(PlanError, match=message):
        read_config(write(tmp_path, table))


def test_published_moe_shapes():
    qwen = shape_of(read_config(EXAMPLES / "qwen3-30b-a3b"))
    assert (qwen.experts, qwen.top_k, qwen.moe_intermediate) == (128, 8, 768)
    assert qwen.params / 1e9 == pytest.approx(30.5, abs=0.1)  # "30B-A3B"
    assert qwen.active_params / 1e9 == pytest.approx(3.3, abs=0.1)
    mixtral = shape_of(read_config(EXAMPLES / "mixtral-8x7b"))
    assert mixtral.params / 1e9 == pytest.approx(46.7, abs=0.1)  # Mistral AI's figures
    assert mixtral.active_params / 1e9 == pytest.approx(12.9, abs=0.1)


@pytest.mark.parametrize("table", [TINY_MOE, TINY_MIXTRAL, TINY_QWEN2_MOE],
                         ids=["qwen3_moe", "mixtral", "qwen2_moe"])
def test_extrapolation_matches_exact_compile(tmp_path, table):
    config = write(tmp_path, table)
    kw = dict(tp=2, chunk=32, batches=(1, 4), max_seq_len=256, block_size=64)
    fast, exact = Predictor(config, **kw), Predictor(config, exact=True, **kw)
    assert fast.layer_counts == (1, 2) and exact.layer_counts == (4,)
    for a, b in [(fast.ttft(100), exact.ttft(100)), (fast.decode_step(1, 120), exact.decode_step(1, 120)),
                 (fast.tpot(4, 100, 20), exact.tpot(4, 100, 20))]:
        assert a.seconds == pytest.approx(b.seconds, rel=0.01)
        assert a.breakdown.weight_dma_s == pytest.approx(b.breakdown.weight_dma_s, rel=0.01)
    fm, em = fast.memory(), exact.memory()
    assert fm.weights == em.weights and fm.kv_block == em.kv_block
    assert em.weights < 0.6 * fast.shape.params * 2  # the experts split over the 2 dies


def test_plan_of_a_tiny_moe(tmp_path):
    planner = Planner(write(tmp_path, TINY_MOE), chunk=32, block_size=64)
    p1, p2 = (planner.plan(tp, batch=[1, 8], prompt_len=64, output_len=16) for tp in (1, 2))
    for p in (p1, p2):
        assert p.fits and p.kv_blocks_left > 0 and p.ttft_s > 0
        assert p.params == shape_of(planner.table).params > p.active_params
        assert "B active)" in repr(p)
    layers = 4 * expert_bytes(E)
    assert p1.memory.weights - p2.memory.weights >= layers // 2  # the experts halve at TP=2
    b1, b8 = p1.decode
    assert b8.tpot_s > b1.tpot_s  # eight tokens choose more experts than one


def test_quantized_moe_is_refused(tmp_path):
    with pytest.raises(PlanError, match="stacked expert"):
        Predictor(write(tmp_path, TINY_MOE), weights="int8")


def test_cli_on_a_tiny_moe(tmp_path, capsys):
    config = write(tmp_path, TINY_MOE)
    assert main([str(config), "--tp", "2", "--prompt-len", "64", "--output-len", "8"]) == 0
    assert "B active)" in capsys.readouterr().out
    assert main([str(config), "--tp", "2", "--batch", "1", "4", "--prompt-len", "64",
                 "--output-len", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    plan = out["plans"][0] if "plans" in out else out
    assert plan["fits"] and plan["active_params"] < plan["params"]


# ---- the documented examples (slow) ------------------------------------------------------------

@pytest.mark.slow
def test_qwen3_30b_a3b_and_mixtral_8x7b_on_atom_max():
    from rebel.npu.spec import GiB

    qwen = Planner(EXAMPLES / "qwen3-30b-a3b")
    p = qwen.plan(4, batch=[1, 8], prompt_len=1024, output_len=256)
    assert p.fits and p.cards == 1 and p.kv_blocks_left > 20
    assert 14.5 * GiB < p.memory.weights < 14.8 * GiB  # a quarter of every expert per die
    assert p.memory.kv_block == 48 * 2 * 1 * 1024 * 128 * 2  # one of the 4 KV heads per die
    b1, b8 = p.decode
    assert b1.tpot_s < b8.tpot_s < 64 / 8 * b1.tpot_s  # 8 experts, then at most 64 of 128
    assert not qwen.plan(4, batch=64).fits  # its KV blocks miss at batch 64
    best = Planner(EXAMPLES / "mixtral-8x7b").min_cards()
    assert best.fits and (best.tp, best.cards) == (8, 2)
    assert 10.9 * GiB < best.memory.weights < 11.3 * GiB

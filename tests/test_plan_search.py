"""rbln-plan's deployment search: servers and cards, TP groups within a server, prefill chunks,
SLOs at a percentile of a replay, request length distributions (tiny configs, fast)."""
from __future__ import annotations

import json
import math

import pytest

from rebel.cli.plan import main
from rebel.errors import InputError, PlanError
from rebel.npu import load_spec
from rebel.plan import Planner, Predictor
from rebel.plan.serving import Lengths, parse_lengths, poisson_trace

from test_plan import TINY, tiny, write  # noqa: F401  (tests/test_plan.py: the tiny config, its writer, fixture)

# 32 heads: TP up to 32 divides them (a group as large as one server of 8 x 4 dies)
WIDE_HEADS = {**TINY, "hidden_size": 256, "num_attention_heads": 32, "num_key_value_heads": 32}


# ---- servers and cards --------------------------------------------------------------------

@pytest.mark.parametrize("cards_per_server", [1, 2, 3, 8])
@pytest.mark.parametrize("tp", [1, 2, 4, 8, 16, 32])
def test_placement_keeps_tp_groups_within_a_server(tmp_path, cards_per_server, tp):
    planner = Planner(write(tmp_path, WIDE_HEADS), cards_per_server=cards_per_server)
    dies = planner.spec.dies
    if tp > cards_per_server * dies:
        with pytest.raises(PlanError, match="cannot span servers"):
            planner.placement(tp, 1)
        assert tp not in planner.valid_tp(64 * dies)
        return
    for replicas in range(1, 13):
        where = planner.placement(tp, replicas)
        assert where.replicas == replicas and where.servers == len(where.server_replicas)
        assert all(0 < c <= cards_per_server for c in where.server_cards)
        assert where.cards == sum(where.server_cards) == planner.cards_for(tp, replicas)
        # as few cards as the groups need: a card per dies // tp replicas, or tp // dies cards each
        need = [math.ceil(k * tp / dies) for k in where.server_replicas]
        assert list(where.server_cards) == need
        groups = where.groups()
        assert len(groups) == replicas
        used = set()
        for server, members in groups:
            assert len(set(members)) == tp  # tp distinct dies ...
            cards = {card for card, _ in members}
            assert all(card < where.server_cards[server] for card in cards)  # ... on this server
            assert all(0 <= die < dies for _, die in members)
            if tp <= dies:
                assert len(cards) == 1  # within one card: the die-to-die link
            else:
                assert len(cards) == tp // dies
            used |= {(server, m) for m in members}
        assert len(used) == replicas * tp  # no die holds two replicas
        # servers are filled before the next one is used
        assert all(k == where.server_replicas[0] for k in where.server_replicas[:-1])
        assert planner.placement_on(tp, where.cards).replicas >= replicas


def test_plan_on_more_cards_than_a_server(tiny):
    planner = Planner(tiny, cards_per_server=8)
    p = planner.plan(tp=2, batch=[1, 4], prompt_len=64, output_len=8, cards=10)
    assert p.cards == 10 and p.servers == 2 and p.server_cards == (8, 2)
    assert p.replicas == 20  # two TP=2 groups per 4-die card
    assert p.watts == 3500.0 and p.watts_per_server == (2800.0, 700.0)
    assert "on 2 server(s)" in repr(p)
    d = p.to_dict()
    assert d["servers"] == 2 and d["watts_per_server"] == [2800.0, 700.0]
    with pytest.raises(PlanError, match="cards per server must be 1 .. 8"):
        Planner(tiny, cards_per_server=9)


def test_search_spreads_replicas_over_servers(tiny):
    """A load one server of one card cannot carry runs on two servers; the search accounts
    servers, cards and watts per server."""
    planner = Planner(tiny, cards_per_server=1)
    kw = dict(prompt_len=200, output_len=20, batches=(1, 4, 16), tp_sizes=[2], chunks=(256,))
    one = planner.search(3000, 100, 100, max_cards=4, **kw)
    assert [(d.cards, d.servers) for d in one.deployments] == [(1, 1)]
    heavy = planner.search(6000, 3, 1, servers=3, **kw)
    assert heavy.max_cards == 3
    d = heavy.deployments[0]
    assert (d.cards, d.servers, d.server_cards, d.replicas) == (2, 2, (1, 1), 4)
    assert d.watts == 700.0 and d.watts_per_server == (350.0, 350.0)
    assert d.to_dict()["servers"] == 2
    # on one server only it misses, and says so
    alone = planner.search(6000, 3, 1, max_cards=1, **kw)
    assert not alone.deployments and "misses the SLOs on up to 1 card(s)" in alone.notes[0]


def test_ca12_and_spec_files_end_to_end(tmp_path, tiny, capsys):
    """RBLN-CA12 (one die per card): a TP=2 group spans two cards and its collectives take
    the card-to-card link; a spec file given by path plans the same way."""
    ca12 = Planner(tiny, "RBLN-CA12")
    p = ca12.plan(tp=2, batch=1, prompt_len=64, output_len=8)
    assert p.hardware == "RBLN-CA12" and p.cards == 2 and p.replicas == 1
    assert p.watts == 2 * load_spec("RBLN-CA12").power_w
    where = ca12.placement(2, 3)
    assert where.server_cards == (6,) and all(len({c for c, _ in g}) == 2 for _, g in where.groups())
    kw = dict(chunk=32, batches=(1,), max_seq_len=128, block_size=64)
    # a slower link than RBLN-CA25's on-card switch: its collectives cost more
    across = Predictor(tiny, "RBLN-CA12", 2, **kw).decode_step(1, 64).breakdown.collective_s
    on_card = Predictor(tiny, "RBLN-CA25", 2, **kw).decode_step(1, 64).breakdown.collective_s
    assert across > on_card > 0
    spec = tmp_path / "mine.toml"
    spec.write_text('base = "RBLN-CA25"\nname = "MY-CARD"\npower_w = 200.0\n')
    for hardware, watts in (("RBLN-CA12", 130.0), (str(spec), 200.0)):
        code = main([str(tiny), "--hardware", hardware, "--search", "--rps", "50", "--ttft-ms", "50",
                     "--tpot-ms", "10", "--prompt-len", "64", "--output-len", "8", "--batch", "1", "4",
                     "--cards", "2", "--json"])
        out = json.loads(capsys.readouterr().out)
        assert code == 0 and out["deployments"]
        assert out["hardware"] == ("RBLN-CA12" if hardware == "RBLN-CA12" else "MY-CARD")
        assert all(d["watts"] == d["cards"] * watts for d in out["deployments"])


# ---- prefill chunk ----------------------------------------------------------------------------

def test_search_reports_the_chosen_prefill_chunk(tiny):
    planner = Planner(tiny)
    kw = dict(prompt_len=200, output_len=20, batches=(1, 4, 16), max_cards=1, tp_sizes=[2])
    r = planner.search(500, 100, 100, chunks=(32, 64, 128, 1024), **kw)
    assert r.chunks == (32, 64, 128, 1024) and r.deployments[0].chunk in r.chunks
    # chunks past the longest prompt (200 tokens) add nothing: only the smallest of them is kept
    assert planner.search(500, 100, 100, chunks=(32, 256, 512), **kw).chunks == (32, 256)
    # small chunks spread a prompt over more steps, each also running the decode batch
    ttft = {c: planner.search(500, 100, 100, chunks=(c,), **kw).deployments[0].ttft_s
            for c in (16, 256)}
    assert ttft[16] > ttft[256]
    with pytest.raises(PlanError, match="prefill chunks must be positive"):
        planner.search(500, 100, 100, chunks=(0,), **kw)


def test_replay_carries_at_most_one_chunk_per_request_a_step(tiny):
    """With a prefill chunk the scheduler gives a request at most that many prompt tokens a
    step (vLLM's long_prefill_token_threshold): a 200-token prompt takes more steps."""
    pytest.importorskip("vllm")
    planner = Planner(tiny)
    trace = poisson_trace(6, 2000.0, 200, 4, seed=1)
    whole = planner.replay(2, [1, 4], 256, trace)
    chunked = planner.replay(2, [1, 4], 256, trace, chunk=32, chunks=(32, 64))
    assert chunked.steps > whole.steps
    assert chunked.percentiles("ttft")[50] > whole.percentiles("ttft")[50]


# ---- percentiles ---------------------------------------------------------------------------------

def test_percentile_search_keeps_only_what_its_replay_confirms(tiny):
    """At a TTFT SLO 5% above the estimate's mean on one card, the mean search answers one card;
    the p90 search replays it, sees the tail miss and bisects up to a card count whose replay
    meets the SLOs at p90, which a fresh replay of that deployment confirms."""
    pytest.importorskip("vllm")
    planner = Planner(tiny, cards_per_server=1)
    kw = dict(prompt_len=200, output_len=20, batches=(1, 4, 16), tp_sizes=[2], chunks=(256,))
    est = planner.search(3000, 100, 100, max_cards=1, **kw).deployments[0]
    slo_ms = est.ttft_s * 1e3 * 1.05
    means = planner.search(3000, slo_ms, 100, max_cards=4, **kw)
    assert means.deployments[0].cards == 1 and means.percentile is None
    calls = []
    p90 = planner.search(3000, slo_ms, 100, max_cards=4, percentile=90, replay_requests=80,
                         progress=lambda *a: calls.append(a), **kw)
    assert p90.percentile == 90 and p90.replays >= 2 and p90.replay_requests == 80
    assert any("replaying" in c[0] for c in calls) and calls[-1][0] == "done"
    d = p90.deployments[0]
    assert d.cards > 1 and d.servers == d.cards  # one card per server here
    assert d.replayed["requests"] == 80
    assert d.replayed["ttft_p90_s"] <= slo_ms / 1e3 and d.replayed["tpot_p90_s"] <= 0.1
    trace = poisson_trace(80, 3000 / d.replicas, 200, 20, seed=0)
    again = planner.replay(d.tp, (1, 4, 16), 220, trace, chunk=d.chunk, chunks=p90.chunks, slots=d.batch)
    assert again.percentiles("ttft")[90] == pytest.approx(d.replayed["ttft_p90_s"])
    # one card fewer misses at p90 (else the bisection would have stopped there)
    fewer = planner.placement_on(d.tp, d.cards - 1)
    short = planner.replay(d.tp, (1, 4, 16), 220,
                           poisson_trace(80, 3000 / fewer.replicas, 200, 20, seed=0),
                           chunk=d.chunk, chunks=p90.chunks, slots=d.batch)
    assert short.percentiles("ttft")[90] > slo_ms / 1e3 or short.percentiles("tpot")[90] > 0.1
    assert "at p90 of a replay" in repr(p90)
    with pytest.raises(PlanError, match="percentile must be one of 50, 90, 99"):
        planner.search(3000, slo_ms, 100, percentile=95, **kw)


def test_cli_percentile_search(tiny, capsys):
    pytest.importorskip("vllm")
    argv = [str(tiny), "--search", "--rps", "3000", "--ttft-ms", "100", "--tpot-ms", "100",
            "--prompt-len", "100:300", "--output-len", "20", "--batch", "1", "4", "16", "--tp", "2",
            "--chunk", "256", "--cards", "2", "--cards-per-server", "1", "--slo-percentile", "p90",
            "--verify", "30"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["percentile"] == 90 and out["prompt_lengths"] == "100:300" and out["prompt_len"] == 200
    d = out["deployments"][0]
    assert d["chunk"] == 256 and d["replayed"]["requests"] == 30 and d["servers"] == 1
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "Confirmed by replay" in text and "p90 meets SLOs" in text and "chunk" in text


# ---- length distributions -----------------------------------------------------------------------

def test_length_distributions_parse():
    assert parse_lengths("1024") == Lengths("fixed", 1024, 1024)
    assert parse_lengths(7) == Lengths("fixed", 7, 7)
    u = parse_lengths("512:2048")
    assert (u.kind, u.low, u.high, u.mean) == ("uniform", 512, 2048, 1280)
    assert parse_lengths((10, 20)) == Lengths("uniform", 10, 20) and str(u) == "512:2048"
    e = parse_lengths("exp:300")
    assert (e.kind, e.high) == ("exp", 1200) and 270 < e.mean < 285  # truncated at 4 x the mean
    n = parse_lengths("normal:500:100")
    assert (n.kind, n.high, n.mean) == ("normal", 900, 500)
    trace = poisson_trace(2000, 10.0, "512:2048", "exp:100:400", seed=1)
    prompts = [r.prompt_len for r in trace]
    outputs = [r.output_len for r in trace]
    assert min(prompts) >= 512 and max(prompts) <= 2048 and abs(sum(prompts) / 2000 - 1280) < 40
    assert max(outputs) <= 400 and abs(sum(outputs) / 2000 - parse_lengths("exp:100:400").mean) < 8


@pytest.mark.parametrize("text, message", [
    ("0", "positive token counts"), ("-5", "positive token counts"), ("many", "give N, LOW:HIGH"),
    ("2048:512", "low end is above its high end"), ("exp:", "give N"),
    ("exp:500:100", "MAX 100 is below the mean 500"), ("normal:5", "give N"), ("1:2:3", "give N"),
    ("zipf:1.2", "give N"),
])
def test_bad_lengths_are_clear_errors(text, message):
    with pytest.raises(InputError, match=message):
        parse_lengths(text, "--prompt-len")


def test_cli_lengths_and_bad_values(tiny, capsys):
    argv = [str(tiny), "--tp", "1", "--batch", "1", "4", "--json"]
    assert main([*argv, "--prompt-len", "32:96", "--output-len", "exp:8:16"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["prompt_len"] == 64 and d["fits"]
    # the longest sequence the distributions allow: 96 + 16 tokens in one 1024-token block
    assert d["blocks_per_seq"] == 1
    assert main([*argv, "--prompt-len", "96:32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rbln-plan: error: --prompt-len '96:32'") and err.count("\n") == 1
    assert main([*argv, "--search", "--slo-percentile", "95"]) == 2
    assert "give 50, 90 or 99" in capsys.readouterr().err
    assert main([*argv, "--search", "--servers", "0"]) == 2
    assert "--servers must be positive" in capsys.readouterr().err

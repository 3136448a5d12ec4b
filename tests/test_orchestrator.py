"""Multi-model pipelines across dies and cards: placement beyond one card, tensor-parallel
collectives on the right link, and the Orchestrator overlapping two requests of a tiny
encoder -> denoiser x N -> decoder pipeline (order kept, dies never shared at once, outputs
unchanged, the trace parsed back)."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import rebel
from rebel.device.events import LINK, NEURAL_ENGINE, TASK_DMA
from rebel.npu import reset_machine
from rebel.profiler import read_trace
from rebel.runtime import Orchestrator
from rebel.runtime.orchestrator import STAGE_TRACK

STEPS = 4


class Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.proj = torch.nn.Linear(32, 64), torch.nn.Linear(64, 64)

    def forward(self, tokens):
        return self.proj(torch.relu(self.emb(tokens)))


class Denoiser(torch.nn.Module):
    """One step: the latents plus an MLP of latents and context (TP splits up/down)."""

    def __init__(self):
        super().__init__()
        self.ctx, self.up, self.down = (torch.nn.Linear(64, 64), torch.nn.Linear(64, 256),
                                        torch.nn.Linear(256, 64))

    def forward(self, latents, context):
        return latents + 0.5 * self.down(F.gelu(self.up(latents + self.ctx(context))))


class Decoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.out = torch.nn.Linear(64, 128)

    def forward(self, latents):
        return torch.tanh(self.out(latents))


def example():
    g = torch.Generator().manual_seed(3)
    return torch.randn(8, 32, generator=g), torch.randn(8, 64, generator=g)


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    enc, den, dec = Encoder().eval(), Denoiser().eval(), Decoder().eval()
    tokens, latents = example()
    context = torch.randn(8, 64)  # not `latents` again: the same tensor twice captures as one input
    return {
        "enc": rebel.compile_from_torch(enc, example_inputs=[tokens]),
        "den": rebel.compile_from_torch(den, example_inputs=[latents, context]),
        "den2": rebel.compile_from_torch(den, example_inputs=[latents, context], tensor_parallel_size=2),
        "den4": rebel.compile_from_torch(den, example_inputs=[latents, context], tensor_parallel_size=4),
        "dec": rebel.compile_from_torch(dec, example_inputs=[latents]),
        "modules": (enc, den, dec),
    }


@pytest.fixture
def two_cards(monkeypatch):
    monkeypatch.setenv("RBLN_VIRTUAL_CARDS", "2")
    reset_machine()


class Pipe:
    """A pipeline as diffusers writes one: submodule runtimes called from host code."""

    def __init__(self, text_encoder, denoiser, decoder, pause_s=0.0):
        self.text_encoder, self.denoiser, self.decoder = text_encoder, denoiser, decoder
        self.pause_s = pause_s

    def __call__(self, tokens, latents):
        context = self.text_encoder(tokens)
        for _ in range(STEPS):
            if self.pause_s:
                time.sleep(self.pause_s)  # the scheduler's host work
            latents = self.denoiser(latents, context) * 0.9  # host op between steps
        return self.decoder(latents)


def make_pipe(compiled, enc_dev, den_key, den_dev, dec_dev, pause_s=0.0):
    return Pipe(rebel.Runtime(compiled["enc"], device=enc_dev), rebel.Runtime(compiled[den_key], device=den_dev),
                rebel.Runtime(compiled["dec"], device=dec_dev), pause_s)


def two_requests(orch, pipe):
    tokens, latents = example()
    orch.label(pipe)  # stages named after the pipeline's attributes
    outputs = []
    for name in ("r1", "r2"):
        with orch.request(name):
            outputs.append(pipe(tokens, latents))
    return outputs


def test_orchestrated_two_requests_overlap_and_keep_order(compiled, two_cards):
    pipe = make_pipe(compiled, 0, "den2", [1, 2], 3)
    orch = Orchestrator(host_gap_s=2e-6)
    assert set(orch.label(pipe)) == {"text_encoder", "denoiser", "decoder"}
    two_requests(orch, pipe)
    plan = orch.schedule()
    runs = [r for req in orch.requests for r in req.runs]
    assert [r.stage for r in orch.requests[0].runs] == ["text_encoder"] + ["denoiser"] * STEPS + ["decoder"]
    assert sum(r.latency_s + r.host_gap_s for r in runs) == pytest.approx(plan.sequential_s, rel=1e-12)
    assert plan.orchestrated_s < 0.9 * plan.sequential_s
    plan.check()
    # dependencies: each request's runs in order, each computing only after the previous ended
    for name in ("r1", "r2"):
        mine = sorted((r for r in plan.runs if r.request == name), key=lambda r: r.index)
        assert [r.index for r in mine] == list(range(STEPS + 2))
        for a, b in zip(mine, mine[1:]):
            assert b.compute_s >= a.end_s + 2e-6 - 1e-12 and b.start_s >= a.start_s
    # a die never runs two things at once (its device events do not overlap across runs)
    for d in plan.dies:
        spans = sorted((r.start_s, r.end_s) for r in plan.runs if d in r.devices)
        assert all(b[0] >= a[1] - 1e-12 for a, b in zip(spans, spans[1:]))
    # the overlap is the one wanted: r2's encoding during r1's denoising loop
    enc2 = next(r for r in plan.runs if r.request == "r2" and r.stage == "text_encoder")
    den1 = [r for r in plan.runs if r.request == "r1" and r.stage == "denoiser"]
    assert den1[0].start_s < enc2.end_s and enc2.start_s < den1[-1].end_s
    util = plan.utilisation()
    assert set(util) == {0, 1, 2, 3} and util[1] == util[2] > util[0] > 0 and max(util.values()) <= 1
    assert "sequential" in plan.report() and "rbln:1" in plan.report()
    assert "Schedule(2 requests, 12 runs" in repr(plan) and "Orchestrator(2 requests, 12 runs" in repr(orch)


def test_outputs_unchanged_under_the_orchestrator(compiled, two_cards):
    pipe = make_pipe(compiled, 0, "den2", [1, 2], 3)
    tokens, latents = example()
    plain = pipe(tokens, latents)
    recorded = two_requests(Orchestrator(host_gap_s=0.0), pipe)
    assert all(torch.equal(plain, out) for out in recorded)
    enc, den, dec = compiled["modules"]
    with torch.no_grad():
        c, x = enc(tokens), latents
        for _ in range(STEPS):
            x = den(x, c) * 0.9
        reference = dec(x)
    assert (plain - reference).abs().max().item() < 2e-2


def test_everything_on_one_die_gains_nothing(compiled):
    pipe = make_pipe(compiled, 0, "den", 0, 0)
    orch = Orchestrator(host_gap_s=0.0)
    two_requests(orch, pipe)
    plan = orch.schedule()
    assert plan.orchestrated_s == pytest.approx(plan.sequential_s, rel=1e-12)
    assert all(r.preload_s == 0 for r in plan.runs)
    assert plan.dies == [0]


def test_predictive_dma_issues_the_next_stage_ahead(compiled, two_cards):
    pipe = make_pipe(compiled, 0, "den2", [1, 2], 3)
    orch = Orchestrator(host_gap_s=2e-6)
    two_requests(orch, pipe)
    with_dma, without = orch.schedule(), orch.schedule(predictive_dma=False)
    assert with_dma.orchestrated_s < without.orchestrated_s < without.sequential_s
    assert all(r.preload_s == 0 for r in without.runs)
    # r1's first denoising step goes on dies 1-2 while the encoder still computes on die 0
    first = next(r for r in with_dma.runs if r.request == "r1" and r.stage == "denoiser")
    enc = next(r for r in with_dma.runs if r.request == "r1" and r.stage == "text_encoder")
    assert first.preload_s > 0 and first.start_s < enc.end_s
    early = [e for e in first.events if e.start_s < first.ready_s - 1e-12 and e.device == 1]
    assert early and {e.track for e in early} <= {TASK_DMA, "External HDMA"}  # loads, no compute
    assert any(e.track == TASK_DMA and e.name.startswith("weights") for e in early)
    assert min(e.start_s for e in first.events if e.track in (NEURAL_ENGINE, LINK)) >= first.ready_s - 1e-12
    # the context the encoder produced is copied in only once the encoder is done; the same
    # context in later steps existed before, so its copy goes ahead
    second = orch.requests[0].runs[2]
    assert orch.requests[0].runs[1].early_inputs == frozenset() and len(second.early_inputs) == 1


def test_engine_gate_holds_compute_and_bounds_preloads(compiled):
    """EventEngine.run(inputs_ready_s=, compute_ready_s=): the copy of a late input and every
    kernel wait for the gate; before it only weights load, at most half the shared SRAM."""
    from rebel.device.engine import EventEngine
    from rebel.runtime.timeline import build_steps

    program, spec = compiled["den"].program, compiled["den"].compiled.spec
    steps = build_steps(program, spec)
    plain = EventEngine(spec, 0).run(steps)
    gate = 50e-6
    late = program.inputs[0][0]
    gated = EventEngine(spec, 0).run(steps, inputs_ready_s={late: gate}, compute_ready_s=gate)
    assert min(e.start_s for e in gated.events if e.track == NEURAL_ENGINE) >= gate
    assert min(e.start_s for e in gated.events if e.args.get("value") == late) >= gate
    ahead = [e for e in gated.events if e.track == TASK_DMA and e.start_s < gate]
    assert ahead and all(e.name.startswith("weights") and e.args.get("preload") for e in ahead)
    assert sum(e.args["bytes"] for e in ahead) <= spec.die.memory.shared_sram_bytes // 2
    # issued `gate` early, it ends sooner after the gate than a run started at the gate
    assert gated.end_s - gate < plain.latency_s
    tasks = sorted((e.start_s, e.end_s) for e in gated.events if e.track == TASK_DMA)
    assert all(b[0] >= a[1] - 1e-15 for a, b in zip(tasks, tasks[1:]))  # one queue, no overlap


def test_tensor_parallel_across_cards_uses_the_card_link(compiled, two_cards):
    c = compiled["den4"]
    tokens, latents = example()
    on_card, across = rebel.Runtime(c, device=4), rebel.Runtime(c, device=[2, 3, 4, 5])
    assert on_card.devices == (4, 5, 6, 7)
    for rt in (on_card, across):
        rt.run(latents, latents)
    links = {rt: {e.args["link"] for e in rt.last_report.events if e.track == LINK} for rt in (on_card, across)}
    assert links[on_card] == {"on-card PCIe switch"} and links[across] == {"PCIe Gen5 x16 between cards"}
    assert on_card.last_report.latency_s == pytest.approx(c.predicted_latency_s(device=4), rel=1e-12)
    assert across.last_report.latency_s == pytest.approx(c.predicted_latency_s(device=[2, 3, 4, 5]), rel=1e-12)
    assert c.predicted_latency_s(device=2) == pytest.approx(across.last_report.latency_s, rel=1e-12)
    assert across.last_report.latency_s > on_card.last_report.latency_s
    assert {e.device for e in across.last_report.events if e.device is not None} == {2, 3, 4, 5}
    # the cross-card denoiser in a pipeline: its runs hold the card-to-card link
    pipe = Pipe(rebel.Runtime(compiled["enc"], device=0), across, rebel.Runtime(compiled["dec"], device=1))
    orch = Orchestrator(host_gap_s=1e-6)
    outputs = two_requests(orch, pipe)
    assert torch.equal(outputs[0], outputs[1])
    plan = orch.schedule()
    plan.check()
    assert plan.orchestrated_s < plan.sequential_s and plan.dies == [0, 1, 2, 3, 4, 5]
    with pytest.raises(rebel.DeviceError, match="tensor_parallel_size=4"):
        c.predicted_latency_s(device=[0, 1])


def test_trace_shows_every_stage_on_its_dies(compiled, two_cards, tmp_path):
    pipe = make_pipe(compiled, 0, "den2", [1, 2], 3)
    orch = Orchestrator(host_gap_s=2e-6)
    two_requests(orch, pipe)
    path = orch.schedule().write_trace(tmp_path / "pipeline.pb")
    slices = read_trace(path)
    stages = [s for s in slices if s.track == STAGE_TRACK and s.category == "stage"]
    by_die = {}
    for s in stages:
        by_die.setdefault(s.group.split(" ·")[0], set()).add(s.name)
    assert by_die == {"NPU 0": {"r1/text_encoder", "r2/text_encoder"},
                      "NPU 1": {"r1/denoiser", "r2/denoiser"}, "NPU 2": {"r1/denoiser", "r2/denoiser"},
                      "NPU 3": {"r1/decoder", "r2/decoder"}}
    enc2 = next(s for s in stages if s.name == "r2/text_encoder")
    den1 = [s for s in stages if s.name == "r1/denoiser" and s.group.startswith("NPU 1")]
    assert len(den1) == STEPS
    assert any(d.start_ns < enc2.end_ns and enc2.start_ns < d.end_ns for d in den1)
    assert any(s.category == "preload" and s.name.endswith("predictive DMA") for s in slices)
    assert {s.track for s in slices if s.group == "Host"} >= {"Host · r1", "Host · r2"}
    kernels = [s for s in slices if s.track == NEURAL_ENGINE and s.group.startswith("NPU 1")]
    per_run = [len(r.record.report.kernels) for req in orch.requests for r in req.runs if r.stage == "denoiser"]
    assert len(kernels) == sum(per_run) == 2 * STEPS * per_run[0] > 0


def test_measured_host_gaps_and_names(compiled, tmp_path):
    folder = tmp_path / "text_encoder"
    compiled["enc"].save(folder / "model.rbln")
    enc = rebel.Runtime(rebel.RBLNCompiledModel(folder / "model.rbln"))
    assert enc.name == "text_encoder" and rebel.Runtime(str(folder / "model.rbln")).name == "text_encoder"
    pipe = Pipe(enc, rebel.Runtime(compiled["den"], device=1), rebel.Runtime(compiled["dec"], device=2), 2e-3)
    orch = Orchestrator()  # gaps measured on this machine
    with orch.request("only") as request:
        pipe(*example())
    assert [r.stage for r in request.runs][:2] == ["text_encoder", "model0"]
    assert all(r.host_gap_s >= 2e-3 for r in request.runs[1:STEPS + 1])
    orch.label(pipe.denoiser, "denoiser")
    assert orch.stage_name(pipe.denoiser) == "denoiser"

    class Wrapped:  # the vendor's shape: model.model[i].runtime, a VAE with two graphs
        def __init__(self, *runtimes):
            self.model = [RuntimeWrapper(rt) for rt in runtimes]

    class RuntimeWrapper:
        def __init__(self, runtime):
            self.runtime = runtime

    vendor_like = type("Pipeline", (), {})()
    vendor_like.text_encoder = Wrapped(enc)
    vendor_like.vae = Wrapped(pipe.denoiser, pipe.decoder)
    vendor_like.tokenizer = {"vocab": {str(i): i for i in range(1000)}}
    named = orch.label(vendor_like)
    assert named == {"text_encoder": enc, "vae/0": pipe.denoiser, "vae/1": pipe.decoder}
    assert "Request('only', 6 runs" in repr(request)


def test_predicted_runs_of_meta_models(two_cards):
    """Full-size models compile on meta tensors (no weights) and cannot run: their runs are
    added from the prediction, placed and scheduled like recorded ones."""
    meta = torch.device("meta")
    enc = rebel.compile_from_torch(Encoder().to(meta), example_inputs=[torch.empty(8, 32, device=meta)])
    den = rebel.compile_from_torch(Denoiser().to(meta), tensor_parallel_size=4,
                                   example_inputs=[torch.empty(8, 64, device=meta)] * 2)
    dec = rebel.compile_from_torch(Decoder().to(meta), example_inputs=[torch.empty(8, 64, device=meta)])
    orch = Orchestrator()
    for name in ("r1", "r2"):
        with orch.request(name) as request:
            request.add_predicted(enc, "text_encoder", device=0, host_gap_s=5e-6)
            runs = request.add_predicted(den, "denoiser", device=[2, 3, 4, 5], repeat=STEPS,
                                         host_gap_s=5e-6, early_inputs=[1])
            request.add_predicted(dec, "decoder", device=1, host_gap_s=5e-6)
    assert runs[0].latency_s == pytest.approx(den.predicted_latency_s(device=2), rel=1e-12)
    assert runs[0].early_inputs == {den.program.inputs[1][0]}
    plan = orch.schedule()
    plan.check()
    assert plan.orchestrated_s < plan.sequential_s
    assert plan.sequential_s == pytest.approx(sum(r.latency_s + 5e-6 for q in orch.requests for r in q.runs))
    assert plan.stages()["denoiser"]["runs"] == 2 * STEPS
    with pytest.raises(rebel.DeviceError, match="device 9 does not exist"):
        orch.request("x").add_predicted(enc, "e", device=9)
    bad = orch.request("y")
    with pytest.raises(rebel.RBLNError, match="not an input"):
        bad.add_predicted(den, "d", device=0, early_inputs=["nope"])
    with pytest.raises(rebel.RBLNError, match="repeat must be"):
        bad.add_predicted(den, "d", device=0, repeat=0)
    bad.close()
    with pytest.raises(rebel.RBLNError, match="is closed"):
        bad.add_predicted(enc, "e")


def test_bad_use_gives_clear_errors(compiled):
    with pytest.raises(rebel.DeviceError, match="device 99 does not exist"):
        rebel.Runtime(compiled["enc"], device=99)
    with pytest.raises(rebel.DeviceError, match="device 4 does not exist"):  # one card: 0..3
        rebel.Runtime(compiled["den4"], device=1)
    orch = Orchestrator()
    with pytest.raises(rebel.RBLNError, match="nothing to schedule"):
        orch.schedule()
    request = orch.request("a")
    with request:
        pass
    with pytest.raises(rebel.RBLNError, match="already closed"):
        request.close()
    with pytest.raises(rebel.RBLNError, match="is closed"):
        with request:
            pass
    with pytest.raises(rebel.RBLNError, match="nothing to schedule"):
        orch.schedule()
    with pytest.raises(rebel.RBLNError, match="names must be unique"):
        orch.request("a")
    with orch.request("b"):
        with pytest.raises(rebel.RBLNError, match="another request is recording"):
            with orch.request("c"):
                pass
        rebel.Runtime(compiled["enc"])(example()[0])
    with pytest.raises(rebel.RBLNError, match=r"unknown request\(s\) \['z'\]"):
        orch.schedule(["z"])
    assert len(orch.schedule("b").runs) == 1
    still_open = orch.request("d")
    still_open.__enter__()
    try:
        with pytest.raises(rebel.RBLNError, match="still recording"):
            orch.schedule(["b", "d"])
    finally:
        still_open.close()
    with pytest.raises(rebel.RBLNError, match="host_gap_s"):
        Orchestrator(host_gap_s=-1)
    with pytest.raises(rebel.RBLNError, match="no rebel Runtime found"):
        orch.label(object())

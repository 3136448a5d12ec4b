"""`rebel.explain`: the fallback report, as data, text and command line."""
from __future__ import annotations

import json

import torch
from torch import nn

import rebel
from rebel.runtime.explain import main


class HalfOnHost(nn.Module):
    """linear -> atan (no device kernel) -> linear: two device segments around a host one."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return self.b(torch.atan(self.a(x)))


def _compiled():
    torch.random.default_generator.manual_seed(0)
    return rebel.compile_from_torch(HalfOnHost(), [torch.randn(4, 16)])


def test_explain_reports_device_kernels_host_ops_and_round_trips():
    report = rebel.explain(_compiled())
    b = report.buckets[0]
    assert [s.where for s in b.segments] == ["device", "host", "device"]
    assert b.round_trips == 2 and b.host_ops == 1 and b.device_ops >= 2
    host = b.segments[1].host_ops[0]
    assert host.op == "aten.atan.default" and "no device kernel" in host.reason
    assert all(s.predicted_s > 0 for s in b.segments)
    assert b.predicted_latency_s >= sum(s.predicted_s for s in b.segments) * 0.5
    assert report.host_fallback_reasons()[("aten.atan.default", host.reason)] == 1
    assert 0 < b.device_share < 1
    text = str(report)
    assert "HOST" in text and "aten.atan.default" in text and "round trips: 2" in text


def test_explain_as_data_is_json():
    data = rebel.explain(_compiled()).to_dict()
    again = json.loads(json.dumps(data))
    assert again["buckets"][0]["round_trips"] == 2
    assert again["buckets"][0]["segments"][1]["host_ops"][0]["op"] == "aten.atan.default"


def test_explain_command_line(tmp_path, capsys):
    path = _compiled().save(tmp_path / "m.rbln")
    assert main([str(path)]) == 0
    assert "aten.atan.default" in capsys.readouterr().out
    assert main([str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["buckets"][0]["host_ops"] == 1
    assert main([str(tmp_path / "missing.rbln")]) == 2
    assert "no compiled model" in capsys.readouterr().err


def test_fully_on_device_model_has_one_round_trip():
    report = rebel.explain(rebel.compile_from_torch(nn.Linear(8, 8), [torch.randn(2, 8)]))
    assert report.buckets[0].round_trips == 1 and report.buckets[0].host_ops == 0

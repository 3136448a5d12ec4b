"""rbln-plan --report: the HTML page with its plots, opened in headless Chromium (as a reviewer
would open it): the page loads every picture, and its screenshot is not blank."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from rebel.plan import Planner
from rebel.plan.report import write_report

from test_plan import TINY, write

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        pytest.skip("needs Chromium (.ci/run installs Debian's chromium package)")
    return found


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    planner = Planner(write(root, TINY))
    plans = [planner.plan(tp=tp, batch=[1, 2, 4], prompt_len=100, output_len=20) for tp in (1, 2)]
    search = planner.search(rps=5.0, ttft_ms=1000.0, tpot_ms=100.0, prompt_len=100, output_len=20,
                            batches=[1, 2, 4], max_cards=1)
    return write_report(root / "out", plans, search), plans, search


def test_report_files(report):
    page, plans, search = report
    names = {p.name for p in page.parent.iterdir()}
    assert {"index.html", "latency_throughput.png", "breakdown.png", "dram.png"} <= names
    assert ("frontier.png" in names) == bool(search.deployments)
    text = page.read_text()
    assert "TP=1" in text and "TP=2" in text and "<img" in text
    assert f"{plans[0].decode[0].tpot_s * 1e3:.2f}" in text  # the table holds the plan's figures


def test_report_opens_in_headless_chromium(report, tmp_path):
    browser = chromium()
    page = report[0]
    pictures = sum(1 for p in page.parent.iterdir() if p.suffix == ".png")
    dom = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                          "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # the page's own script counts the pictures that loaded (complete, with a width)
    assert f'data-images="{pictures}"' in dom.stdout and f'data-loaded="{pictures}"' in dom.stdout, \
        dom.stdout[-1500:]
    shot = tmp_path / "page.png"
    run = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}",
                          "--window-size=1000,2400", f"--screenshot={shot}", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    from PIL import Image
    image = Image.open(shot).convert("RGB")
    assert image.size == (1000, 2400)
    colors = image.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # plots' lines and bars, not a blank page


def test_cli_simulates_and_reports(tmp_path, capsys):
    """rbln-plan --simulate: the plan's replica serves a Poisson trace through vLLM's scheduler;
    --trace replays a JSONL trace; --report writes the page with the latency distributions."""
    pytest.importorskip("vllm")
    import json

    from rebel.cli.plan import main

    folder = write(tmp_path, TINY)
    out = tmp_path / "out"
    code = main([str(folder), "--tp", "1", "--batch", "1", "2", "4", "--prompt-len", "60",
                 "--output-len", "12", "--simulate", "30", "--rps", "100000", "--json",
                 "--report", str(out)])
    assert code == 0
    got = json.loads(capsys.readouterr().out)
    serving = got["serving"]
    assert serving["requests"] == 30 and serving["steps"] > 12
    assert 0 < serving["ttft_p50_s"] <= serving["ttft_p99_s"] and serving["tpot_p50_s"] > 0
    assert serving["queued_p99_s"] > 0  # all at once on 4 slots: requests wait
    assert (out / "serving.png").is_file() and "Simulated trace" in (out / "index.html").read_text()
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"arrival_s": i * 0.01, "prompt_len": 20 + i,
                                         "output_len": 5}) + "\n" for i in range(6)))
    assert main([str(folder / "config.json"), "--tp", "1", "--batch", "1", "2", "--trace",
                 str(trace), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["serving"]["requests"] == 6
    trace.write_text('{"arrival_s": "soon"}\n')
    assert main([str(folder), "--tp", "1", "--trace", str(trace)]) == 2
    assert "trace.jsonl:1" in capsys.readouterr().err


def test_cli_search_verifies_tails(tmp_path, capsys):
    """--verify N replays each deployment the search found and reports its percentiles."""
    pytest.importorskip("vllm")
    import json

    from rebel.cli.plan import main

    folder = write(tmp_path, TINY)
    assert main([str(folder), "--search", "--rps", "20", "--ttft-ms", "1000", "--tpot-ms", "100",
                 "--prompt-len", "60", "--output-len", "12", "--batch", "1", "2", "4",
                 "--cards", "1", "--verify", "25", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)["deployments"]
    assert found and all(d["verified"]["requests"] == 25 for d in found)
    assert all(0 < d["verified"]["ttft_p50_s"] <= d["verified"]["ttft_p90_s"] for d in found)

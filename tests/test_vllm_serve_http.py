"""`vllm serve <compiled folder>`: vLLM's OpenAI-compatible server on the rbln platform.

One server start serves every check (an engine start costs ~40 s on these cores): completions
and chat completions whose greedy tokens equal optimum.rbln's `generate`, streaming, a request the
plugin refuses (HTTP 400 with a message, not 500), concurrent requests that all come back, a
JSON-schema answer (vLLM's grammar bitmask) and the predicted NPU time on `/metrics`.
The compiled folder and the reference tokens come from test_vllm_rbln's fixtures and helpers.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vllm_rbln needs vLLM: pip install 'open-rbln[vllm]'")

from transformers import AutoTokenizer  # noqa: E402

from test_vllm_rbln import compiled, expected, folders, prompts  # noqa: E402,F401  (fixtures)

STARTUP_S = 300  # engine start ~40 s here; the 2 cores are shared with other jobs
GREEDY = dict(temperature=0.0, max_tokens=10, ignore_eos=True, return_token_ids=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    """POST JSON; the status and the JSON body, error statuses included (urllib raises them)."""
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def stream(url: str, body: dict, timeout: float = 120) -> list[dict]:
    """The `data:` events of a server-sent-events response, up to `[DONE]`."""
    request = urllib.request.Request(url, json.dumps({**body, "stream": True}).encode(),
                                     {"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for line in response:
            line = line.decode().strip()
            if line.startswith("data: "):
                if line == "data: [DONE]":
                    return events
                events.append(json.loads(line[len("data: "):]))
    raise AssertionError(f"stream ended without [DONE] after {len(events)} events")


def vllm_command() -> list[str]:
    """The `vllm` console script of this interpreter's environment (what users run), or the same
    `main()` through -m where the script is not installed next to the interpreter."""
    script = Path(sys.executable).with_name("vllm")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "vllm.entrypoints.cli.main"]


@pytest.fixture(scope="module")
def server(folders, tmp_path_factory):
    """`vllm serve` on a free local port, ready (/health answers 200); stopped in the finally."""
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("no `vllm` distribution: `vllm serve` needs the alias the Makefile installs "
                    "(pip install --no-deps --no-build-isolation ./packaging/vllm-alias)")
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "INFO"}
    command = vllm_command() + ["serve", str(folders[1]), "--host", "127.0.0.1", "--port",
                                str(port), "--max-num-seqs", "4", "--max-model-len", "128",
                                "--block-size", "32",
                                # a random model left to itself fills JSON with whitespace
                                "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert process.poll() is None, f"vllm serve exited:\n{log.read_text()[-5000:]}"
            assert time.monotonic() < deadline, f"no /health in {STARTUP_S} s:\n" \
                                                f"{log.read_text()[-5000:]}"
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        yield base, str(folders[1]), log
    finally:
        process.terminate()  # SIGTERM: uvicorn shuts the engine down
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_vllm_serve_answers_openai_requests(server, compiled):
    base, model, log = server
    tokenizer = AutoTokenizer.from_pretrained(model)

    # completion, from token ids: the greedy tokens of generate on the same compiled folder
    prompt = prompts(3)[2]
    status, body = post(base + "/v1/completions", {"model": model, "prompt": prompt, **GREEDY})
    assert status == 200, body
    assert body["choices"][0]["token_ids"] == expected(compiled, prompt, 10)

    # chat completion: the chat template applied by the server, then the same greedy tokens
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    status, body = post(base + "/v1/chat/completions",
                        {"model": model, "messages": messages, **GREEDY})
    assert status == 200, body
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    templated = list(templated["input_ids"] if hasattr(templated, "keys") else templated)
    assert body["choices"][0]["token_ids"] == expected(compiled, templated, 10)

    # streaming completion: text arrives in pieces that add up to the whole answer
    whole = tokenizer.decode(expected(compiled, prompt, 10))
    events = stream(base + "/v1/completions", {"model": model, "prompt": prompt,
                                               **{k: v for k, v in GREEDY.items()
                                                  if k != "return_token_ids"}})
    assert len(events) > 1
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == whole

    # what the plugin cannot honour is the client's error (400 with the reason), not the server's
    status, body = post(base + "/v1/completions", {"model": model, "prompt": prompt,
                                                   "max_tokens": 2, "prompt_logprobs": 1})
    assert status == 400, body
    assert "does not support prompt_logprobs" in json.dumps(body)

    # concurrent requests (more than the compiled batch of 4): none lost, each its own answer
    batch = prompts(6)
    with ThreadPoolExecutor(len(batch)) as pool:
        answers = list(pool.map(lambda p: post(base + "/v1/completions",
                                               {"model": model, "prompt": p, **GREEDY}), batch))
    assert [status for status, _ in answers] == [200] * len(batch)
    assert [body["choices"][0]["token_ids"] for _, body in answers] == \
        [expected(compiled, p, 10) for p in batch]

    # the server is still healthy after the refused request
    with urllib.request.urlopen(base + "/health", timeout=10) as response:
        assert response.status == 200
    # the worker logs what the steps would cost on the NPU (the emulation's wall time does not)
    assert "vllm_rbln: predicted NPU time per step" in log.read_text()

    # a JSON-schema response (vLLM's grammar bitmask on the logits): valid JSON of that schema
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                               "sure": {"type": "boolean"}},
              "required": ["answer", "sure"], "additionalProperties": False}
    status, body = post(base + "/v1/chat/completions",
                        {"model": model, "messages": [{"role": "user", "content": "Yes or no?"}],
                         "max_tokens": 60, "temperature": 0.0,
                         "response_format": {"type": "json_schema",
                                             "json_schema": {"name": "a", "schema": schema}}})
    assert status == 200, body
    answer = json.loads(body["choices"][0]["message"]["content"])
    assert set(answer) == {"answer", "sure"} and answer["answer"] in ("yes", "no")
    assert isinstance(answer["sure"], bool)

    # the predicted NPU time on /metrics beside vLLM's own metrics
    values = scrape(base)
    assert sum(v for k, v in values.items() if k.startswith("vllm:request_success_total")) >= 10
    steps = values["vllm_rbln:npu_step_seconds_count"]
    assert steps > 0 and values["vllm_rbln:npu_step_seconds_sum"] > 0
    assert values['vllm_rbln:npu_step_seconds_bucket{le="+Inf"}'] == steps
    prefill = values['vllm_rbln:npu_seconds_total{phase="prefill"}']
    decode = values['vllm_rbln:npu_seconds_total{phase="decode"}']
    assert prefill > 0 and decode > 0
    assert prefill + decode == pytest.approx(values["vllm_rbln:npu_step_seconds_sum"])
    # one more request adds its steps
    post(base + "/v1/completions", {"model": model, "prompt": prompt, **GREEDY})
    assert scrape(base)["vllm_rbln:npu_step_seconds_count"] >= steps + 10


def scrape(base: str) -> dict[str, float]:
    """`/metrics` as {sample name with labels: value} (Prometheus text format)."""
    with urllib.request.urlopen(base + "/metrics", timeout=30) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values

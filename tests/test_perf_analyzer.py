"""perf_analyzer (tritonclient 2.51) and genai-perf against our models: the input data they get, and short streaming
measurements against a served SmolLM2 (slow) whose outputs parse."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tritonllm.client.perf import (
    parse_metrics, parse_perf_csv, perf_analyzer_binary, perf_analyzer_env, run_perf_analyzer, write_input_data,
)
from tritonllm.python_backends.front import ENSEMBLE_INPUTS, REQUEST_INPUTS

PROMPTS = ["The capital of France is", "Write one sentence about the sea.", "List three prime numbers:"]


def test_input_data_uses_the_ensemble_contract(tmp_path):
    path = write_input_data(PROMPTS, tmp_path / "ensemble.json", output_tokens=8)
    entries = json.loads(path.read_text())["data"]
    assert [entry["text_input"] for entry in entries] == [[prompt] for prompt in PROMPTS]
    for entry in entries:
        assert set(entry) <= set(ENSEMBLE_INPUTS)
        assert entry["max_tokens"] == entry["min_tokens"] == [8] and entry["stream"] == [True]


def test_input_data_for_the_front_model_carries_the_cache_mode(tmp_path):
    entries = json.loads(write_input_data(PROMPTS, tmp_path / "llm.json", 8, llm_cache="bypass").read_text())["data"]
    assert all(set(entry) <= set(REQUEST_INPUTS) and entry["cache"] == ["bypass"] for entry in entries)
    with pytest.raises(ValueError, match="llm_cache"):
        write_input_data(PROMPTS, tmp_path / "bad.json", 8, llm_cache="sometimes")
    with pytest.raises(ValueError, match="prompt"):
        write_input_data([], tmp_path / "none.json", 8)


def test_perf_analyzer_binary_runs_with_its_libraries():
    done = subprocess.run([str(perf_analyzer_binary()), "--version"], env=perf_analyzer_env(), capture_output=True,
                          text=True)
    assert done.returncode == 0 and "2.51" in done.stdout + done.stderr


def test_parse_metrics_reads_labels_and_skips_comments():
    text = ('# HELP x_total help\n# TYPE x_total counter\nx_total{model="engine",reason="a \\"b\\""} 3\n'
            'plain 1.5e3\n')
    samples = parse_metrics(text)
    assert [(s.name, s.labels, s.value) for s in samples] == [
        ("x_total", {"model": "engine", "reason": 'a "b"'}, 3.0), ("plain", {}, 1500.0)]


@pytest.mark.server
@pytest.mark.parametrize("model", ["ensemble", "llm"])
def test_perf_analyzer_streaming_measurement_parses(server, tmp_path, model):
    output_tokens, requests = 4, 3
    input_data = write_input_data(PROMPTS, tmp_path / "input.json", output_tokens,
                                  llm_cache="bypass" if model == "llm" else None)
    [level] = run_perf_analyzer(server.endpoints.grpc_url, model, input_data, [2], tmp_path, requests)
    assert (level.model, level.concurrency, level.requests) == (model, 2, requests)
    assert level.requests_per_s > 0 and level.output_tokens_per_s > level.requests_per_s
    assert 0 < level.ttft_s["p50"] <= level.latency_s["p50"] and level.itl_s["p50"] > 0
    row = parse_perf_csv(level.csv_path)
    assert row["Concurrency"] == 2
    export = json.loads(level.export_path.read_text())
    # Every request streamed exactly one response per forced token (the final flag rides on the last token).
    assert [len(r["response_timestamps"]) for r in export["experiments"][0]["requests"]] == [output_tokens] * requests


@pytest.mark.server
def test_genai_perf_measures_the_ensemble(server, smollm2_hf_dir, tmp_path):
    from tritonllm.client.genai_perf import GenaiPerfError, genai_perf_binary, run_genai_perf

    try:
        genai_perf_binary()
    except GenaiPerfError as error:
        pytest.skip(str(error))
    [level] = run_genai_perf(server.endpoints.grpc_url, "ensemble", smollm2_hf_dir, PROMPTS, [1], 2, 4, tmp_path)
    assert level.requests == 2 and level.output_tokens_per_s > 0
    assert 0 < level.ttft_s["p50"] <= level.latency_s["p50"]


def run_perf_command(*args: str) -> subprocess.CompletedProcess:
    tritonllm = str(Path(sys.executable).parent / "tritonllm")
    return subprocess.run([tritonllm, "perf", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("args, message", [
    (("--tool", "locust"), "--tool 'locust' is not allowed"),
    (("--models", "engine"), "--models 'engine' is not allowed"),
    (("--requests", "4", "--concurrency", "1,8"), "at most --requests (4)"),
    (("--llm-cache", "refresh"), "--llm-cache 'refresh' is not allowed"),
])
def test_perf_command_rejects_bad_options(args, message):
    done = run_perf_command(*args)
    assert done.returncode == 2 and message in done.stderr  # usage errors exit with 2 (issue 9)


@pytest.mark.server
def test_perf_command_writes_results_for_both_models(server, smollm2_hf_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    done = run_perf_command("--url", server.endpoints.grpc_url, "--prompt-file", str(prompts), "--tokenizer",
                            str(smollm2_hf_dir), "--requests", "2", "--concurrency", "2", "--output-tokens", "3",
                            "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    levels = json.loads((tmp_path / "out" / "perf.json").read_text())["levels"]
    assert [(level["model"], level["concurrency"], level["requests"]) for level in levels] == [
        ("ensemble", 2, 2), ("llm", 2, 2)]

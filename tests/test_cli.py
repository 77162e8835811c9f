"""The `tritonllm` command as a user runs it: build reuse, lint exit codes, generate against a running server."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TRITONLLM = str(Path(sys.executable).parent / "tritonllm")


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([TRITONLLM, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.model
def test_second_build_reuses_the_first(smollm2_build):
    from tritonllm.builders.pipeline import build

    again = build(model=None, precision="fp32")
    assert again.cached
    assert again.repository_dir == smollm2_build.repository_dir


@pytest.mark.model
def test_build_command_prints_the_cached_repository(smollm2_build):
    done = run_cli("build")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(smollm2_build.repository_dir)


@pytest.mark.model
def test_lint_command_passes_a_rendered_repository_and_fails_a_broken_copy(smollm2_build, tmp_path):
    done = run_cli("lint", str(smollm2_build.repository_dir))
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "repository"
    shutil.copytree(smollm2_build.repository_dir, broken, symlinks=True,
                    ignore=shutil.ignore_patterns("*.onnx", "*.onnx.data", "*.data"))
    config = broken / "ensemble" / "config.pbtxt"
    config.write_text(config.read_text().replace('value: "_TOKENS_BATCH"', 'value: "_TOKENS_BATCHES"', 1))
    done = run_cli("lint", str(broken))
    assert done.returncode == 1
    assert "ensemble/config.pbtxt" in done.stdout + done.stderr


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_generate_command_streams_an_answer(server, protocol):
    url = server.endpoints.grpc_url if protocol == "grpc" else server.endpoints.http_url
    done = run_cli("generate", "What is 2 plus 2?", "--url", url, "--protocol", protocol, "--max-tokens", "12")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_generate_command_reports_an_unreachable_server():
    done = run_cli("generate", "hi", "--url", "127.0.0.1:9", "--max-tokens", "4", timeout=120)
    assert done.returncode == 1
    assert "127.0.0.1:9" in done.stderr


def test_build_command_rejects_unknown_engine():
    done = run_cli("build", "--engine", "vllm")
    assert done.returncode == 2  # a usage error (issue 9: every user error exits with 2)
    assert "onnxruntime, trtllm" in done.stderr


@pytest.mark.parametrize("args, names", [
    (("serve", "--precision", "bf16"), ("--precision", "'bf16'", "fp32, int8")),
    (("serve", "--admin-key", "short"), ("--admin-key", "16 to 256 characters")),
    (("build", "--precision", "fp16"), ("--precision", "'fp16'", "fp32, int8")),
    (("build", "--engine", "trtllm"), ("--quant", "fp8")),
    (("build", "--quant", "fp8"), ("--quant", "--engine onnxruntime")),
    (("generate", "hi", "--protocol", "udp"), ("--protocol", "'udp'", "grpc, http")),
    (("generate", "hi", "--model", "gpt"), ("--model", "'gpt'", "ensemble, llm")),
    (("bench", "--peers", "vllm"), ("--peers", "'vllm'", "hf-sequential, hf-static, none")),
    (("bench", "--concurrency", "0,8"), ("--concurrency", "'0,8'", ">= 1")),
    (("perf", "--tool", "locust"), ("--tool", "'locust'", "perf_analyzer, genai-perf")),
    (("perf", "--models", "ensemble,gpt"), ("--models", "ensemble, llm")),
    (("perf", "--concurrency", "64", "--requests", "8"), ("--concurrency", "--requests (8)")),
    (("perf", "--llm-cache", "refresh"), ("--llm-cache", "'refresh'", "bypass, use")),
    (("build", "--max-batch-size", "many"), ("--max-batch-size", "'many'", "integer")),
    (("lint",), ("repository",)),
    (("build", "--bogus"), ("--bogus",)),
])
def test_user_errors_are_one_line_naming_the_option_and_exit_2(args, names):
    done = run_cli(*args, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: ")
    for name in names:
        assert name in done.stderr


def test_build_refuses_unknown_or_misplaced_recipes_before_any_work():
    unknown = run_cli("build", "--engine", "trtllm", "--quant", "fp8", "--recipe", "fp8-rowwise,fp8-bogus",
                      timeout=120)
    assert unknown.returncode == 1 and "['fp8-bogus'] is not known; allowed: fp8-per-tensor+fp8-kv" in unknown.stderr
    misplaced = run_cli("build", "--recipe", "fp8-rowwise", timeout=120)
    assert misplaced.returncode == 2 and "--recipe" in misplaced.stderr

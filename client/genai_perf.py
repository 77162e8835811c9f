"""Run NVIDIA genai-perf 0.0.16 against our ensemble (or the front model `llm`) and read its results.

genai-perf wants numpy 2 while tritonclient/pytriton 2.51 cap numpy below 2, so it lives in its own environment:
`make genai-perf-setup` installs requirements-genai-perf.txt into `.venv-genai-perf` (or set GENAI_PERF_VENV).
It drives perf_analyzer, and its own venv holds only the empty `perf_analyzer` placeholder from PyPI: the real binary
of this environment's tritonclient wheel is put first on PATH, with its libraries (client/perf.py).

Our ensemble keeps the input names of NVIDIA's TensorRT-LLM ensemble, so `--backend tensorrtllm --endpoint-type
kserve` works, with one difference: with `--output-tokens-mean-deterministic` genai-perf sends NVIDIA's `min_length`,
which our ensemble names `min_tokens` (perf_analyzer then stops with "The input or output 'min_length' is not found in
the model configuration"). Force the output length with `--extra-inputs min_tokens:N` instead, as done here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tritonllm.client.perf import perf_analyzer_binary, perf_analyzer_env

GENAI_PERF_VENV = ".venv-genai-perf"
RESULT_FILE = "profile_export_genai_perf.json"


class GenaiPerfError(RuntimeError):
    pass


def venv_tool(command: str, venv: Path | None, default_venv: str, error: type[Exception]) -> Path:
    """`command` of `venv`, else of $<TOOL>_VENV (GENAI_PERF_VENV for .venv-genai-perf), else of ./`default_venv`,
    else the one on PATH; `error` says how to install it (`make <tool>-setup`)."""
    tool = default_venv.removeprefix(".venv-")
    variable = f"{tool.replace('-', '_').upper()}_VENV"
    for folder in (venv, os.environ.get(variable), default_venv):
        if folder and (Path(folder) / "bin" / command).is_file():
            return Path(folder) / "bin" / command
    on_path = shutil.which(command)
    if on_path:
        return Path(on_path)
    raise error(f"{command} not found: run `make {tool}-setup` (its own venv, {default_venv}) or set {variable} to a "
                f"venv holding requirements-{tool}.txt")


def genai_perf_binary(venv: Path | None = None) -> Path:
    return venv_tool("genai-perf", venv, GENAI_PERF_VENV, GenaiPerfError)


def write_prompt_file(prompts: list[str], path: Path) -> Path:
    """genai-perf `--input-file`: JSONL with a `text` field per prompt."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": prompt}) + "\n" for prompt in prompts))
    return path


def genai_perf_command(binary: Path, url: str, model: str, tokenizer_dir: Path, prompt_file: Path, concurrency: int,
                       request_count: int, output_tokens: int, artifact_dir: Path,
                       extra_inputs: dict[str, str] | None = None) -> list[str]:
    command = [str(binary), "profile", "-m", model, "--backend", "tensorrtllm", "--endpoint-type", "kserve",
               "--streaming", "-u", url, "--tokenizer", str(tokenizer_dir), "--input-file", str(prompt_file),
               "--concurrency", str(concurrency), "--request-count", str(request_count),
               "--output-tokens-mean", str(output_tokens), "--extra-inputs", f"min_tokens:{output_tokens}",
               "--artifact-dir", str(artifact_dir)]
    for name, value in (extra_inputs or {}).items():
        command += ["--extra-inputs", f"{name}:{value}"]
    return command


@dataclass
class ProfileLevel:
    """One concurrency level as genai-perf or its successor AIPerf reports it (both export the same metric names)."""

    model: str
    concurrency: int
    requests: int
    requests_per_s: float
    output_tokens_per_s: float  # output tokens counted by re-tokenizing the streamed text with --tokenizer
    output_tokens_mean: float
    ttft_s: dict[str, float]
    itl_s: dict[str, float]  # per request: (latency - TTFT) / (output tokens - 1), then percentiles
    latency_s: dict[str, float]
    result_path: Path


def parse_profile_export(result_path: Path, model: str, concurrency: int) -> ProfileLevel:
    """genai-perf's `profile_export_genai_perf.json` or AIPerf's `profile_export_aiperf.json` (milliseconds) in
    seconds."""
    data = json.loads(Path(result_path).read_text())

    def seconds(metric: str) -> dict[str, float]:
        stats = data[metric]
        return {key: stats[key] / 1000 for key in ("p50", "p95", "p99", "avg") if key in stats}

    return ProfileLevel(
        model=model, concurrency=concurrency, requests=int(data["request_count"]["avg"]),
        requests_per_s=data["request_throughput"]["avg"], output_tokens_per_s=data["output_token_throughput"]["avg"],
        output_tokens_mean=data["output_sequence_length"]["avg"], ttft_s=seconds("time_to_first_token"),
        itl_s=seconds("inter_token_latency"), latency_s=seconds("request_latency"), result_path=Path(result_path))


def run_genai_perf(url: str, model: str, tokenizer_dir: Path, prompts: list[str], levels: list[int],
                   request_count: int, output_tokens: int, out_dir: Path, venv: Path | None = None,
                   extra_inputs: dict[str, str] | None = None) -> list[ProfileLevel]:
    """One genai-perf run per concurrency level against a running server (`url`: gRPC host:port)."""
    binary = genai_perf_binary(venv)
    prompt_file = write_prompt_file(prompts, out_dir / "genai_perf_prompts.jsonl")
    # The real perf_analyzer first on PATH; genai-perf reads the tokenizer folder only (no hub).
    env = perf_analyzer_env(path_first=perf_analyzer_binary().parent) | {"HF_HUB_OFFLINE": "1"}
    results = []
    for concurrency in levels:
        artifact_dir = out_dir / f"genai_perf_{model}_c{concurrency}"
        shutil.rmtree(artifact_dir, ignore_errors=True)
        command = genai_perf_command(binary, url, model, tokenizer_dir, prompt_file, concurrency, request_count,
                                     output_tokens, artifact_dir, extra_inputs)
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        artifact_dir.mkdir(parents=True, exist_ok=True)
        (artifact_dir / "genai_perf.log").write_text(done.stdout + done.stderr)
        found = sorted(artifact_dir.rglob(RESULT_FILE))
        if done.returncode != 0 or not found:
            raise GenaiPerfError(f"genai-perf exited with {done.returncode} (log: {artifact_dir}/genai_perf.log):\n"
                                 f"{done.stdout[-1500:]}{done.stderr[-1500:]}")
        results.append(parse_profile_export(found[0], model, concurrency))
    return results

"""Run NVIDIA AIPerf (genai-perf's successor) against the OpenAI gateway or Triton's own HTTP streaming endpoint, and
read its results.

Two targets, the same prompts and the same forced output length, so one tool measures both sides of the gateway:
- the gateway's `/v1/chat/completions` (aiperf's `chat` endpoint, SSE, `ignore_eos` forces the length);
- Triton's `/v2/models/<model>/generate_stream` (aiperf's `template` endpoint, SSE, `min_tokens` forces the length,
  the chat template applied by the ensemble, as the gateway applies it before it calls Triton).

AIPerf's dependencies (numpy 2, transformers 5) do not fit the main environment (tritonclient/pytriton 2.51 cap numpy
below 2), so it lives in its own venv: `make aiperf-setup` installs requirements-aiperf.txt into `.venv-aiperf` (or
set AIPERF_VENV). It reads the tokenizer from the build's folder; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tritonllm.client.genai_perf import ProfileLevel, parse_profile_export, venv_tool, write_prompt_file

AIPERF_VENV = ".venv-aiperf"
RESULT_FILE = "profile_export_aiperf.json"
WARMUP_REQUESTS = 2  # opens the connections and loads the kernels before the measured requests


class AiperfError(RuntimeError):
    pass


@dataclass(frozen=True)
class AiperfTarget:
    """Where aiperf sends its requests: a name for the results, the base URL, the model name it sends, and the
    endpoint arguments of its command line."""

    name: str
    url: str
    model: str
    endpoint_args: tuple[str, ...]


def gateway_chat_target(base_url: str, served_model: str, api_key: str | None = None) -> AiperfTarget:
    """The OpenAI gateway's chat endpoint; `ignore_eos` so every answer has the asked length."""
    args = ("--endpoint-type", "chat", "--extra-inputs", "ignore_eos:true")
    return AiperfTarget("gateway-chat", base_url, served_model,
                        args + (("--api-key", api_key) if api_key else ()))


# Triton's generate extension: the ensemble's own input names; aiperf fills in the prompt text and the output length.
GENERATE_STREAM_TEMPLATE = ('{"text_input": {{ text|tojson }}, "max_tokens": {{ max_tokens }}, '
                            '"min_tokens": {{ max_tokens }}, "stream": true, "apply_chat_template": true, '
                            '"exclude_input_in_output": true}')


def triton_generate_target(http_url: str, model: str, work_dir: Path) -> AiperfTarget:
    """Triton's `/v2/models/<model>/generate_stream` (SSE), the chat template applied by the model."""
    template = Path(work_dir) / "generate_stream_template.json"
    template.parent.mkdir(parents=True, exist_ok=True)
    template.write_text(GENERATE_STREAM_TEMPLATE)
    return AiperfTarget(f"triton-{model}", http_url, model,
                        ("--endpoint-type", "template", "--custom-endpoint", f"/v2/models/{model}/generate_stream",
                         "--extra-inputs", f"payload_template:{template}",
                         "--extra-inputs", "response_field:text_output"))


def aiperf_binary(venv: Path | None = None) -> Path:
    return venv_tool("aiperf", venv, AIPERF_VENV, AiperfError)


def aiperf_command(binary: Path, target: AiperfTarget, tokenizer_dir: Path, prompt_file: Path, concurrency: int,
                   request_count: int, output_tokens: int, artifact_dir: Path) -> list[str]:
    return [str(binary), "profile", "-m", target.model, *target.endpoint_args, "--streaming", "-u", target.url,
            "--tokenizer", str(tokenizer_dir), "--input-file", str(prompt_file), "--custom-dataset-type",
            "single_turn", "--output-tokens-mean", str(output_tokens), "--output-tokens-stddev", "0",
            "--concurrency", str(concurrency), "--request-count", str(request_count),
            "--warmup-request-count", str(WARMUP_REQUESTS), "--random-seed", "0", "--ui-type", "none",
            # Neither is read here; under load on 2 cores these optional services miss their heartbeats and
            # aiperf then exits 1 although every request was measured.
            "--no-server-metrics", "--no-gpu-telemetry",
            "--artifact-dir", str(artifact_dir)]


def run_aiperf(target: AiperfTarget, tokenizer_dir: Path, prompts: list[str], levels: list[int], request_count: int,
               output_tokens: int, out_dir: Path, venv: Path | None = None) -> list[ProfileLevel]:
    """One aiperf run per concurrency level against a running server; every request must succeed."""
    binary = aiperf_binary(venv)
    prompt_file = write_prompt_file(prompts, Path(out_dir) / "aiperf_prompts.jsonl")
    results = []
    for concurrency in levels:
        artifact_dir = Path(out_dir) / f"aiperf_{target.name}_c{concurrency}"
        shutil.rmtree(artifact_dir, ignore_errors=True)
        command = aiperf_command(binary, target, tokenizer_dir, prompt_file, concurrency, request_count,
                                 output_tokens, artifact_dir)
        done = subprocess.run(command, capture_output=True, text=True, env=_aiperf_env())
        artifact_dir.mkdir(parents=True, exist_ok=True)
        (artifact_dir / "aiperf_run.log").write_text(done.stdout + done.stderr)
        result = artifact_dir / RESULT_FILE
        if done.returncode != 0 or not result.is_file():
            raise AiperfError(f"aiperf exited with {done.returncode} (log: {artifact_dir}/aiperf_run.log):\n"
                              f"{done.stdout[-1500:]}{done.stderr[-1500:]}")
        failed = _failed_requests(result)
        if failed:
            raise AiperfError(f"aiperf: {failed} of {request_count} requests to {target.name} failed; see {result}")
        results.append(parse_profile_export(result, target.name, concurrency))
    return results


def _aiperf_env() -> dict[str, str]:
    """The environment without the Hugging Face offline switches: in offline mode aiperf 0.13 looks a tokenizer up
    as a hub cache entry and refuses a local folder; a folder is read from disk either way."""
    return {name: value for name, value in os.environ.items()
            if name not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")} | {"HF_HUB_DISABLE_TELEMETRY": "1"}


def _failed_requests(result: Path) -> int:
    data = json.loads(result.read_text())
    return sum(int(entry.get("count", 1)) for entry in data.get("error_summary") or [])

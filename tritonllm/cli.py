"""The `tritonllm` command: build, serve, demo, generate, lint (and bench/perf for measurements)."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Build a Hugging Face causal LM into a Triton model repository, serve it, and measure it.")
console = Console(stderr=True)

DEFAULT_PROMPT = "Explain in two sentences what an inference server does."


def _fail(message: str, code: int = 1) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


@app.command()
def build(
    model: Optional[str] = typer.Option(None, help="HF folder or .gguf file; default: the bundled SmolLM2-135M"),
    out: Optional[Path] = typer.Option(None, help="output folder; default: a content-keyed folder in the cache"),
    precision: str = typer.Option("fp32", help="ONNX engine precision: fp32, int8 or int4"),
    engine: str = typer.Option("onnxruntime", help="onnxruntime (any machine) or trtllm (NVIDIA GPU)"),
    quant: Optional[str] = typer.Option(None, help="with --engine trtllm: fp8"),
    kv_cache_dtype: Optional[str] = typer.Option(None, help="with --quant fp8: fp8 quantizes the KV cache too"),
    calib: Optional[Path] = typer.Option(None, help="calibration prompts (JSONL with a 'prompt' or 'text' field)"),
    calib_size: int = typer.Option(128, help="calibration prompts to use"),
    max_batch_size: int = typer.Option(16, help="sequences decoded together per engine step"),
    kv_cache_max_tokens: int = typer.Option(32768, help="KV cache budget in tokens over all running sequences"),
    gate_min_agreement: float = typer.Option(0.90, help="FP8 gate: min greedy top-1 agreement with the fp32 model"),
    gate_max_perplexity_increase: float = typer.Option(0.05, help="FP8 gate: max relative perplexity increase"),
    served_engine_dir: Optional[str] = typer.Option(None, help="TensorRT-LLM engine folder as the server sees it"),
) -> None:
    """Build the model (and its Triton model repository)."""
    from tritonllm.builders.errors import BuildError
    from tritonllm.builders.settings import EngineSettings, SettingsError

    try:
        if engine == "onnxruntime":
            if quant:
                _fail("--quant applies to --engine trtllm; the ONNX engine takes --precision fp32|int8|int4")
            from tritonllm.builders.pipeline import build as build_onnx

            result = build_onnx(model=model, out_dir=out, precision=precision, console=console,
                                engine=EngineSettings(precision=precision, max_batch_size=max_batch_size,
                                                      kv_cache_max_tokens=kv_cache_max_tokens))
            console.print(f"[green]repository:[/] {result.repository_dir}")
            print(result.repository_dir)
        elif engine == "trtllm":
            from tritonllm.builders.trtllm_pipeline import build_trtllm

            if quant != "fp8":
                _fail("--engine trtllm needs --quant fp8 (the only TensorRT-LLM quantization this project gates)")
            if kv_cache_dtype not in (None, "fp8"):
                _fail(f"--kv-cache-dtype {kv_cache_dtype!r} is not supported; allowed: fp8 (or leave it out)")
            from tritonllm.builders.fp8_verify import GateThresholds
            from tritonllm.builders.trtllm import TensorRTLLMUnavailable

            try:
                result = build_trtllm(
                    model=model, out_dir=out, calib_file=calib, calib_size=calib_size,
                    kv_cache_fp8=kv_cache_dtype == "fp8", served_engine_dir=served_engine_dir,
                    gate=GateThresholds(min_top1_agreement=gate_min_agreement,
                                        max_perplexity_increase=gate_max_perplexity_increase),
                    engine=EngineSettings(kind="tensorrt_llm", max_batch_size=max_batch_size,
                                          kv_cache_max_tokens=kv_cache_max_tokens), console=console)
            except TensorRTLLMUnavailable as missing:
                console.print(f"[yellow]stopped after the accuracy gate:[/] {missing}", markup=False)
                raise typer.Exit(2)
            console.print(f"[green]repository:[/] {result.repository_dir}")
            print(result.repository_dir)
        else:
            _fail(f"--engine {engine!r} is not known; allowed: onnxruntime, trtllm")
    except (BuildError, SettingsError, FileNotFoundError) as error:
        _fail(str(error))


def _default_repository(precision: str) -> Path:
    from tritonllm.builders.pipeline import build as build_onnx

    return build_onnx(model=None, precision=precision, console=console).repository_dir


def _run_server(repository: Optional[Path], host: str, http_port: int, grpc_port: int, metrics_port: int,
                precision: str, demo_prompt: Optional[str]) -> None:
    from tritonllm.server import ServerError, TritonServer

    repository = repository or _default_repository(precision)
    server = TritonServer(repository, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with console.status("starting tritonserver ..."):
            server.start()
    except ServerError as error:
        _fail(str(error))
    ep = server.endpoints
    console.print(f"[green]serving[/] {repository}\n  HTTP    http://{ep.http_url}  (generate_stream: "
                  f"/v2/models/ensemble/generate_stream)\n  gRPC    {ep.grpc_url}\n  metrics {ep.metrics_url}\n"
                  f"  log     {server.log_file}\nCtrl-C stops it.")
    try:
        if demo_prompt:
            from tritonllm.client.api import GenerationParams, LLMClient

            console.print(f"[bold]>>> {demo_prompt}[/]")
            for piece in LLMClient(ep.grpc_url).stream(demo_prompt, GenerationParams(max_tokens=128,
                                                                                       apply_chat_template=True)):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        while not stop.wait(0.5):
            if not server.is_running():
                _fail(f"tritonserver stopped unexpectedly; log: {server.log_file}\n{server.log_tail()}")
    except KeyboardInterrupt:
        pass
    finally:
        console.print("stopping tritonserver ...")
        server.stop()


@app.command()
def serve(
    repository: Optional[Path] = typer.Option(None, help="rendered repository; default: build the bundled model"),
    host: str = typer.Option("127.0.0.1"),
    http_port: int = typer.Option(8000),
    grpc_port: int = typer.Option(8001),
    metrics_port: int = typer.Option(8002),
    precision: str = typer.Option("fp32", help="precision of the default build (when --repository is not given)"),
) -> None:
    """Start tritonserver on a repository and serve until Ctrl-C or SIGTERM."""
    _run_server(repository, host, http_port, grpc_port, metrics_port, precision, None)


@app.command()
def demo(
    prompt: str = typer.Option(DEFAULT_PROMPT, help="chat prompt streamed once the server is ready"),
    host: str = typer.Option("127.0.0.1"),
    http_port: int = typer.Option(8000),
    grpc_port: int = typer.Option(8001),
    metrics_port: int = typer.Option(8002),
) -> None:
    """Main job: build the bundled model (cached), serve it, stream one chat answer, keep serving until Ctrl-C."""
    _run_server(None, host, http_port, grpc_port, metrics_port, "fp32", prompt)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="prompt text"),
    url: Optional[str] = typer.Option(None, help="host:port; default 127.0.0.1:8001 (gRPC) or :8000 (HTTP)"),
    protocol: str = typer.Option("grpc", help="grpc or http"),
    model: str = typer.Option("ensemble", help="ensemble, or llm (front model with the semantic cache)"),
    stream: bool = typer.Option(True, "--stream/--no-stream"),
    max_tokens: int = typer.Option(128),
    temperature: Optional[float] = typer.Option(None),
    top_p: Optional[float] = typer.Option(None),
    top_k: Optional[int] = typer.Option(None),
    seed: Optional[int] = typer.Option(None),
    chat: bool = typer.Option(True, "--chat/--raw", help="wrap the prompt in the model's chat template"),
) -> None:
    """Send one prompt and print the answer (streamed as it comes with --stream)."""
    from tritonllm.client.api import GenerationError, GenerationParams, LLMClient

    if protocol not in ("grpc", "http"):
        _fail(f"--protocol {protocol!r} is not known; allowed: grpc, http")
    client = LLMClient(url or f"127.0.0.1:{8001 if protocol == 'grpc' else 8000}", protocol, model)
    params = GenerationParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                              apply_chat_template=chat)
    try:
        if stream:
            for piece in client.stream(prompt, params):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            print(client.generate(prompt, params))
    except GenerationError as error:
        _fail(str(error))
    except Exception as error:  # connection refused and the like: say where we tried
        _fail(f"cannot reach {client.url} over {protocol}: {error}")


@app.command()
def bench(
    url: Optional[str] = typer.Option(None, help="gRPC host:port of a running server; default: start one here"),
    precision: str = typer.Option("fp32", help="precision of the server started here"),
    requests: int = typer.Option(64, help="requests per concurrency level (tritonllm)"),
    prompt_file: Optional[Path] = typer.Option(None, help="prompts (text lines or JSONL); default: synthetic"),
    min_prompt_tokens: int = typer.Option(100),
    max_prompt_tokens: int = typer.Option(200),
    output_tokens: int = typer.Option(64, help="fixed output length (min_tokens = max_tokens)"),
    concurrency: str = typer.Option("1,8,16", help="comma-separated client concurrency levels"),
    peers: str = typer.Option("hf-sequential,hf-static", help="comma-separated: hf-sequential, hf-static, none"),
    peer_requests: int = typer.Option(16, help="requests per level for the (slow) peers"),
    out: Path = typer.Option(Path("bench-results"), help="folder for bench.json and bench.png"),
) -> None:
    """Measure tokens/s, TTFT, ITL and latency percentiles of the deployment and of its peers, side by side."""
    import os

    from tritonllm.client.bench import first_error, results_table, run_level, save_results, speedups
    from tritonllm.client.peers import HFSequential, HFStaticBatching, TritonStream
    from tritonllm.client.workload import load_prompt_file, synthetic_prompts
    from tritonllm.builders.pipeline import build as build_onnx
    from transformers import AutoTokenizer

    levels = [int(c) for c in concurrency.split(",") if c.strip()]
    peer_names = [p.strip() for p in peers.split(",") if p.strip() and p.strip() != "none"]
    unknown = set(peer_names) - {"hf-sequential", "hf-static"}
    if unknown or not levels or min(levels) < 1:
        _fail(f"bad --peers {sorted(unknown)} or --concurrency {concurrency!r}; peers: hf-sequential, hf-static")
    built = build_onnx(model=None, precision=precision, console=console)
    tokenizer = AutoTokenizer.from_pretrained(built.hf_dir)
    prompts = load_prompt_file(prompt_file) if prompt_file else synthetic_prompts(
        tokenizer, requests, min_prompt_tokens, max_prompt_tokens)
    prompts = (prompts * (requests // len(prompts) + 1))[:requests]
    server = None
    if url is None:
        from tritonllm.server import TritonServer

        server = TritonServer(built.repository_dir).start()
        url = server.endpoints.grpc_url
    results = []
    try:
        systems = [(TritonStream(url, name=f"tritonllm-onnx-{precision}"), prompts)]
        threads = os.cpu_count()
        for name in peer_names:
            with console.status(f"loading {name} ..."):
                peer = HFSequential(str(built.hf_dir), threads) if name == "hf-sequential" else \
                    HFStaticBatching(str(built.hf_dir), threads=threads)
            systems.append((peer, prompts[:peer_requests]))
        for system, system_prompts in systems:
            error = first_error(system, system_prompts[0], 4)
            if error:
                _fail(f"{system.name} failed a warm-up request: {error}")
            for level in levels:
                with console.status(f"{system.name}: {len(system_prompts)} requests at concurrency {level} ..."):
                    results.append(run_level(system, system_prompts, output_tokens, level))
                console.print(results_table(results[-1:]))
    finally:
        if server is not None:
            server.stop()
    meta = {"title": f"SmolLM2-135M, {requests} requests, prompts {min_prompt_tokens}-{max_prompt_tokens} tokens, "
                     f"{output_tokens} new tokens, greedy, {os.cpu_count()} CPU cores",
            "output_tokens": output_tokens, "concurrency": levels, "peer_requests": peer_requests,
            "prompt_tokens": [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]}
    meta["speedups"] = speedups(results, systems[0][0].name)
    json_path, png_path = save_results(results, meta, out)
    console.print(results_table(results))
    console.print(f"speedups of {systems[0][0].name} (output tokens/s ratio): {meta['speedups']}")
    console.print(f"wrote {json_path} and {png_path}")


@app.command()
def perf(
    url: Optional[str] = typer.Option(None, help="gRPC host:port of a running server; default: start one here"),
    tool: str = typer.Option("perf_analyzer", help="perf_analyzer, or genai-perf (its own venv: "
                                                   "`make genai-perf-setup`)"),
    models: str = typer.Option("ensemble,llm", help="comma-separated: ensemble, llm (front model)"),
    concurrency: str = typer.Option("1,8", help="comma-separated client concurrency levels"),
    requests: int = typer.Option(32, help="requests per concurrency level"),
    prompt_file: Optional[Path] = typer.Option(None, help="prompts (text lines or JSONL); default: synthetic"),
    min_prompt_tokens: int = typer.Option(100, help="synthetic prompts: shortest, in tokens"),
    max_prompt_tokens: int = typer.Option(200, help="synthetic prompts: longest, in tokens"),
    output_tokens: int = typer.Option(64, help="fixed output length (min_tokens = max_tokens)"),
    llm_cache: str = typer.Option("bypass", help="`cache` input sent to llm: bypass (measure generation) or use"),
    tokenizer: Optional[Path] = typer.Option(None, help="HF folder of the served model (synthetic prompts, "
                                                          "genai-perf's token counts); default: the bundled build's"),
    precision: str = typer.Option("fp32", help="precision of the server started here"),
    out: Path = typer.Option(Path("perf-results"), help="folder for inputs, the tool's own outputs and perf.json"),
) -> None:
    """Measure the ensemble and the front model with NVIDIA's tools (streaming over gRPC) at each concurrency."""
    from tritonllm.client.genai_perf import GenaiPerfError, run_genai_perf
    from tritonllm.client.perf import (
        LLM_CACHE_MODES, PERF_MODELS, PerfAnalyzerError, perf_table, run_perf_analyzer, save_perf_results,
        write_input_data,
    )
    from tritonllm.client.workload import load_prompt_file, synthetic_prompts

    levels = [int(c) for c in concurrency.split(",") if c.strip()]
    model_names = [m.strip() for m in models.split(",") if m.strip()]
    if tool not in ("perf_analyzer", "genai-perf"):
        _fail(f"--tool {tool!r} is not known; allowed: perf_analyzer, genai-perf")
    if not model_names or set(model_names) - set(PERF_MODELS):
        _fail(f"--models {models!r} is not allowed; allowed: {', '.join(PERF_MODELS)}")
    if not levels or min(levels) < 1 or requests < max(levels):
        _fail(f"--concurrency {concurrency!r} needs levels >= 1 and at most --requests ({requests})")
    if llm_cache not in LLM_CACHE_MODES:
        _fail(f"--llm-cache {llm_cache!r} is not allowed; allowed: {', '.join(LLM_CACHE_MODES)}")
    built = None
    if url is None or tokenizer is None:
        from tritonllm.builders.pipeline import build as build_onnx

        built = build_onnx(model=None, precision=precision, console=console)
    tokenizer = tokenizer or built.hf_dir
    if prompt_file is not None:
        prompts = load_prompt_file(prompt_file)
    else:
        from transformers import AutoTokenizer

        prompts = synthetic_prompts(AutoTokenizer.from_pretrained(tokenizer), requests, min_prompt_tokens,
                                    max_prompt_tokens)
    server = None
    if url is None:
        from tritonllm.server import TritonServer

        with console.status("starting tritonserver ..."):
            server = TritonServer(built.repository_dir).start()
        url = server.endpoints.grpc_url
    results = []
    try:
        for model in model_names:
            cache = llm_cache if model == "llm" else None
            input_data = out / f"input_data_{model}.json"
            if tool == "perf_analyzer":
                write_input_data(prompts, input_data, output_tokens, llm_cache=cache)
            for level in levels:
                with console.status(f"{tool}: {model}, {requests} requests at concurrency {level} ..."):
                    if tool == "genai-perf":
                        results += run_genai_perf(url, model, tokenizer, prompts, [level], requests, output_tokens,
                                                  out, extra_inputs={"cache": cache} if cache else None)
                    else:
                        results += run_perf_analyzer(url, model, input_data, [level], out, requests)
                console.print(perf_table(results[-1:], tool))
    except (PerfAnalyzerError, GenaiPerfError) as error:
        _fail(str(error))
    finally:
        if server is not None:
            server.stop()
    meta = {"tool": tool, "url": url, "requests": requests, "output_tokens": output_tokens, "concurrency": levels,
            "prompts": str(prompt_file) if prompt_file else f"synthetic {min_prompt_tokens}-{max_prompt_tokens} tokens",
            "llm_cache": llm_cache}
    path = save_perf_results(results, meta, out / "perf.json")
    console.print(perf_table(results, tool))
    console.print(f"wrote {path} (and the tool's own outputs per level in {out})")


@app.command()
def lint(repository: Path = typer.Argument(..., help="model repository to check")) -> None:
    """Check an (ops-edited) model repository before Triton loads it."""
    from tritonllm.builders.lint import format_findings, lint_repository

    findings = lint_repository(repository)
    if findings:
        console.print(format_findings(findings), markup=False, highlight=False)
    errors = [f for f in findings if getattr(f, "severity", "error") == "error"]
    if errors:
        raise typer.Exit(1)
    console.print(f"[green]{repository}: no problems found[/]")


if __name__ == "__main__":
    app()

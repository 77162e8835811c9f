"""The `tritonllm` command: build, serve, demo, generate, lint (and bench/perf for measurements).

Each command parses its options into typed values and calls one library function; what it does lives there
(`builders.pipeline.build`, `builders.trtllm_pipeline.build_trtllm`, `client.bench.run`, `client.perf.run`, ...).
A user error (a bad option value, an unknown option) prints one line naming the option and what is allowed and
exits with 2; a failure of the work itself prints one line and exits with 1.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import select
import signal
import stat
import sys
import threading
import typing
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console

from tritonllm.contract import PRECISIONS, GatewayModel, GatewaySettings

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Build a Hugging Face causal LM into a Triton model repository, serve it, and measure it.")
console = Console(stderr=True)

DEFAULT_PROMPT = "Explain in two sentences what an inference server does."
USAGE_ERROR = 2  # a bad option: nothing ran
ADMIN_KEY_HELP = ("key that unlocks Triton's model control, shared-memory, logging and trace APIs (header "
                  "tritonllm-admin-key); default: $TRITONLLM_ADMIN_KEY, else a random key (closed)")
FAILED = 1  # the work failed


def _choices(name: str, *values: str) -> type[enum.Enum]:
    """A str Enum of the values an option allows (typer shows them in --help and refuses any other)."""
    return enum.Enum(name, {value.replace("-", "_"): value for value in values}, type=str)


Engine = _choices("Engine", "onnxruntime", "trtllm")
Precision = _choices("Precision", *PRECISIONS)  # what the ONNX Runtime engine serves
Quant = _choices("Quant", "fp8", "int4_awq")  # builders.fp8.QUANTS (not imported here: it pulls in torch)
KvCacheDtype = _choices("KvCacheDtype", "fp8", "bf16")
Protocol = _choices("Protocol", "grpc", "http")
Model = _choices("Model", "ensemble", "llm")
GatewayTarget = _choices("GatewayTarget", *typing.get_args(GatewayModel))
Tool = _choices("Tool", "perf_analyzer", "genai-perf")
LlmCache = _choices("LlmCache", "bypass", "use")


def _fail(message: str, code: int = FAILED) -> NoReturn:
    """One line on stderr (a multi-line message is joined) and exit `code`."""
    line = "; ".join(part.strip() for part in str(message).splitlines() if part.strip())
    console.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _usage_error(option: str, value: object, allowed: str) -> NoReturn:
    _fail(f"{option} {value!r} is not allowed; allowed: {allowed}", USAGE_ERROR)


def _comma_list(allowed: tuple[str, ...] | None = None, cast: Callable[[str], object] = str,
                allowed_text: str = "") -> Callable[[str], list]:
    """Parser of a comma-separated option whose items are `allowed` names (or `cast` values)."""
    def parse(text: str) -> list:
        items = [item.strip() for item in text.split(",") if item.strip()]
        try:
            values = [cast(item) for item in items]
        except ValueError:
            raise typer.BadParameter(f"{text!r} is not allowed; allowed: {allowed_text}") from None
        if not values or (allowed is not None and set(items) - set(allowed)):
            raise typer.BadParameter(f"{text!r} is not allowed; allowed: {allowed_text or ', '.join(allowed)}")
        return values

    return parse


def _levels(text: str) -> list[int]:
    levels = _comma_list(cast=int, allowed_text="comma-separated integers >= 1, e.g. 1,8,16")(text)
    if min(levels) < 1:
        raise typer.BadParameter(f"{text!r} is not allowed; allowed: comma-separated integers >= 1, e.g. 1,8,16")
    return levels


@app.command()
def build(
    model: Optional[str] = typer.Option(None, help="HF folder, .gguf file, or a bundled model: "
                                                   "smollm2-135m-instruct (default), gemma3-270m"),
    out: Optional[Path] = typer.Option(None, help="output folder; default: a content-keyed folder in the cache"),
    precision: Precision = typer.Option(Precision.fp32, help="ONNX engine precision"),
    engine: Engine = typer.Option(Engine.onnxruntime, help="onnxruntime (any machine) or trtllm (NVIDIA GPU)"),
    quant: Optional[Quant] = typer.Option(
        None, help="with --engine trtllm: fp8 or int4_awq (W4A16 AWQ; the ONNX engine's AWQ is --precision int4)"),
    kv_cache_dtype: Optional[KvCacheDtype] = typer.Option(
        None, help="with --quant: search only recipes with an fp8 (or bf16) KV cache; default: both"),
    recipe: Optional[str] = typer.Option(
        None, help="with --quant: search only these recipes (comma-separated, in the search's order), e.g. "
                   "fp8-rowwise; default: all"),
    calib: Optional[Path] = typer.Option(
        None, help="calibration prompts (JSONL with a 'prompt' or 'text' field, e.g. a captured-traffic file): "
        "--quant fp8|int4_awq, or --precision int4 (AWQ)"),
    calib_size: int = typer.Option(128, help="calibration prompts to use"),
    max_batch_size: int = typer.Option(16, help="sequences decoded together per engine step"),
    kv_cache_max_tokens: int = typer.Option(32768, help="KV cache budget in tokens over all running sequences"),
    gate_min_agreement: float = typer.Option(0.90, help="FP8 gate: min greedy top-1 agreement with the fp32 model"),
    gate_max_perplexity_increase: float = typer.Option(0.05, help="FP8 gate: max relative perplexity increase"),
    served_engine_dir: Optional[str] = typer.Option(None, help="TensorRT-LLM engine folder as the server sees it"),
    draft: Optional[Precision] = typer.Option(
        None, help="speculative draft model in this precision: the model itself (int4/int8 self-draft) or "
                   "--draft-model; requests then speculate with it by default"),
    draft_model: Optional[str] = typer.Option(
        None, help="HF folder or .gguf of a draft model sharing the tokenizer (default precision int8)"),
) -> None:
    """Build the model (and its Triton model repository)."""
    from tritonllm.builders.errors import BuildError
    from tritonllm.contract import EngineSettings, SettingsError

    if engine is Engine.onnxruntime and quant is not None:
        _usage_error("--quant", quant.value,
                     f"nothing with --engine onnxruntime (it takes --precision {'|'.join(PRECISIONS)}; its int4 is "
                     f"INT4 AWQ)")
    if engine is Engine.onnxruntime and recipe is not None:
        _usage_error("--recipe", recipe, "nothing with --engine onnxruntime (recipes are --quant's, TensorRT-LLM's)")
    if engine is Engine.trtllm and (draft is not None or draft_model is not None):
        _usage_error("--draft" if draft is not None else "--draft-model", (draft and draft.value) or draft_model,
                     "nothing with --engine trtllm (speculative drafting is the ONNX Runtime engine's)")
    if engine is Engine.trtllm and quant is None:
        _fail("--quant is required with --engine trtllm; allowed: fp8, int4_awq (the TensorRT-LLM quantizations "
              "this project gates)", USAGE_ERROR)
    try:
        if engine is Engine.onnxruntime:
            from tritonllm.builders.pipeline import build as build_onnx

            if calib is not None and precision.value != "int4":
                _usage_error("--calib", str(calib), "with --engine onnxruntime only together with --precision int4 "
                             "(its AWQ scales are calibrated); fp32 and int8 calibrate nothing")
            result = build_onnx(model=model, out_dir=out, precision=precision.value, console=console,
                                calibration_file=calib,
                                engine=EngineSettings(precision=precision.value, max_batch_size=max_batch_size,
                                                      kv_cache_max_tokens=kv_cache_max_tokens),
                                draft=draft.value if draft is not None else None, draft_model=draft_model)
            calibration = result.cache_calibration  # from the build report
            if calibration:
                console.print(f"[green]semantic cache:[/] similarity_threshold {calibration['similarity_threshold']} "
                              f"derived for max_false_hit_rate {calibration['max_false_hit_rate']} on "
                              f"{calibration['pairs']} calibration pairs (precision {calibration['precision']}, "
                              f"recall {calibration['recall']})")
        else:
            from tritonllm.builders.fp8_verify import GateThresholds
            from tritonllm.builders.trtllm import TensorRTLLMUnavailable
            from tritonllm.builders.trtllm_pipeline import build_trtllm

            try:
                result = build_trtllm(
                    model=model, out_dir=out, calib_file=calib, calib_size=calib_size,
                    kv_cache_fp8=None if kv_cache_dtype is None else kv_cache_dtype is KvCacheDtype.fp8,
                    served_engine_dir=served_engine_dir, quant=quant.value,
                    recipes=recipe.split(",") if recipe else None,
                    gate=GateThresholds(min_top1_agreement=gate_min_agreement,
                                        max_perplexity_increase=gate_max_perplexity_increase),
                    engine=EngineSettings(kind="tensorrt_llm", max_batch_size=max_batch_size,
                                          kv_cache_max_tokens=kv_cache_max_tokens), console=console)
            except TensorRTLLMUnavailable as missing:
                console.print(f"[yellow]stopped after the accuracy gate:[/] {missing}", markup=False)
                raise typer.Exit(2)
    except SettingsError as error:  # names the setting and what is allowed
        _fail(str(error), USAGE_ERROR)
    except (BuildError, FileNotFoundError) as error:
        _fail(str(error))
    console.print(f"[green]repository:[/] {result.repository_dir}")
    print(result.repository_dir)


class _StopSignals:
    """SIGTERM, SIGINT (Ctrl-C) and SIGHUP (the terminal closed) all stop the command the same orderly way: the
    handler only sets `event`; the main thread, which waits on it (tritonserver's loading too), then runs the
    clean-up, which no further signal can cut short. SIGPIPE stays ignored (Python's default): a client socket that
    breaks in a server thread raises it too; a closed stdout/stderr is noticed by `_output_closed` or as
    BrokenPipeError instead."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self.event = threading.Event()
        # The handler runs on the main thread between two bytecodes, possibly inside Event.wait/set, which hold the
        # event's (non-reentrant) lock: setting the event there deadlocked on a second Ctrl-C. It only writes a byte;
        # a relay thread sets the event.
        read_end, self._write_end = os.pipe()
        threading.Thread(target=self._relay, args=(read_end,), name="stop-signals", daemon=True).start()
        for signum in self.SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, *_: object) -> None:
        try:
            os.write(self._write_end, b"s")
        except OSError:  # the pipe is full: a stop is already on its way
            pass

    def _relay(self, read_end: int) -> None:
        os.read(read_end, 1)
        self.event.set()

    def wait(self, seconds: float) -> bool:
        return self.event.wait(seconds)


def _output_closed() -> bool:
    """Whether stdout or stderr is a pipe whose reader went away (`tritonllm demo | head -1` once head exits):
    Linux reports POLLERR on the write end of a pipe nobody reads."""
    for fd in (1, 2):
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                continue
        except OSError:
            continue
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        if any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0)):
            return True
    return False


def _silence_stdout() -> None:
    """Point stdout at /dev/null once its pipe broke, so the interpreter's last flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _say(message: str) -> None:
    """A status line on stderr that never fails the clean-up (stderr may be a closed pipe by then)."""
    try:
        console.print(message, markup=False, highlight=False)
    except (OSError, ValueError):
        pass


def _run_server(repository: Optional[Path], host: str, http_port: int, grpc_port: int, metrics_port: int,
                precision: Precision, demo_prompt: Optional[str], gateway_port: Optional[int] = None,
                api_keys: Optional[Path] = None, admin_key: Optional[str] = None, health_port: Optional[int] = None,
                supervise: bool = True) -> None:
    from tritonllm.builders.errors import BuildError
    from tritonllm.client.deployment import bundled_build
    from tritonllm.server import ADMIN_HEADER, ADMIN_KEY_ENVIRONMENT, ServerError, TritonServer, admin_key_or_default

    key_source = ("the admin key given" if admin_key or os.environ.get(ADMIN_KEY_ENVIRONMENT)
                  else f"a random key (none given: --admin-key or ${ADMIN_KEY_ENVIRONMENT})")
    try:
        admin_key = admin_key_or_default(admin_key)
    except ServerError as error:
        _fail(str(error), USAGE_ERROR)
    if repository is None:
        try:
            repository = bundled_build(precision.value, console).repository_dir
        except (BuildError, FileNotFoundError) as error:
            _fail(str(error))
    server = TritonServer(repository, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          admin_key=admin_key)
    stop = _StopSignals()
    openai_gateway = supervisor = health_server = None
    try:
        try:
            with console.status("starting tritonserver ..."):
                server.start(stop=stop.event)
        except ServerError as error:
            _fail(str(error))
        if stop.event.is_set():
            return
        ep = server.endpoints
        if supervise:
            supervisor, health_server = _start_supervision(server, host, health_port)
        if gateway_port is not None:
            openai_gateway = _start_gateway(server, repository, host, gateway_port, api_keys)
        console.print(f"[green]serving[/] {repository}\n  HTTP    http://{ep.http_url}  (generate_stream: "
                      f"/v2/models/ensemble/generate_stream)\n  gRPC    {ep.grpc_url}\n  metrics {ep.metrics_url}\n"
                      + (f"  OpenAI  {openai_gateway.url}/v1  (metrics {openai_gateway.url}/metrics)\n"
                         if openai_gateway else "")
                      + f"  control {', '.join(server.restricted_apis)}: header {ADMIN_HEADER} with {key_source}\n"
                      + (f"  health  {health_server.url}/health/ready, /health/live\n" if health_server else "")
                      + f"  log     {server.log_file}\nCtrl-C stops it.")
        if demo_prompt:
            # On a thread, so that the main thread keeps waiting on the stop signals while the answer streams.
            threading.Thread(target=_stream_demo, args=(ep.grpc_url, demo_prompt, stop.event), daemon=True).start()
        while not stop.wait(0.5) and not _output_closed():
            if supervisor is not None and not supervisor.health().live:
                _fail(f"tritonserver did not come back after restarts ({supervisor.health().detail}); "
                      f"log: {server.log_file}")
            if supervisor is None and not server.is_running():
                console.print(server.log_tail(), markup=False, highlight=False)
                _fail(f"tritonserver stopped unexpectedly; log: {server.log_file}")
    except BrokenPipeError:  # stderr was a pipe and its reader went away: stop as on SIGPIPE
        pass
    finally:
        try:
            if openai_gateway is not None:
                openai_gateway.stop()
            if supervisor is not None:
                supervisor.stop()  # before the server stops: it would restart it
            if health_server is not None:
                health_server.stop()
            _say("stopping tritonserver ...")
        finally:
            server.stop()
            if _output_closed():
                _silence_stdout()


def _stream_demo(grpc_url: str, prompt: str, stop: threading.Event) -> None:
    """The demo's one chat answer on stdout; a closed stdout (`tritonllm demo | head -1`) stops the command."""
    from tritonllm.client.api import GenerationParams, LLMClient

    try:
        console.print(f"[bold]>>> {prompt}[/]")
        for piece in LLMClient(grpc_url).stream(prompt, GenerationParams(max_tokens=128, apply_chat_template=True)):
            if stop.is_set():
                return
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        stop.set()
    except Exception as error:  # the server keeps serving; say why the demo answer stopped
        _say(f"demo request failed: {error}")


def _start_supervision(server, host: str, health_port: Optional[int]):
    """The supervisor of `server` (restarts it when a check fails) and, with a port, its health endpoint."""
    from tritonllm.asgi_thread import ASGIStartError, ThreadedASGIServer
    from tritonllm.supervisor import Supervisor, health_app

    supervisor = Supervisor(server, on_restart=lambda reason: _say(f"restarting tritonserver: {reason}")).start()
    if health_port is None:
        return supervisor, None
    try:
        return supervisor, ThreadedASGIServer(health_app(supervisor), host, health_port, "health").start()
    except ASGIStartError as error:
        supervisor.stop()
        _fail(str(error))  # the caller's clean-up stops the server


def _start_gateway(server, repository: Path, host: str, port: int, api_keys: Optional[Path]):
    """The OpenAI gateway in this process, in front of `server` (its `llm` model when it serves one: `auto`)."""
    try:
        return _gateway_server(GatewaySettings(triton_grpc_urls=(server.endpoints.grpc_url,), host=host, port=port),
                               repository, None, api_keys)
    except BaseException:
        server.stop()
        raise


def _gateway_server(settings, repository: Optional[Path], tokenizer: Optional[Path], api_keys: Optional[Path],
                    served_model_name: Optional[str] = None):
    """A started GatewayServer serving the model as `served_model_name`, else as the repository was built to be
    served; bad settings, keys or tokenizer end the command with a one-line error."""
    from tritonllm.contract import SettingsError
    from tritonllm.gateway.server import GatewayError, GatewayServer
    from tritonllm.gateway.tokens import repository_served_name, repository_tokenizer_dir

    try:
        tokenizer_dir = tokenizer if tokenizer is not None else repository_tokenizer_dir(repository)
        name = served_model_name or (repository_served_name(repository) if repository is not None else None)
        if name is not None:
            settings = dataclasses.replace(settings, served_model_name=name)
        return GatewayServer(settings, tokenizer_dir, api_keys).start()
    except SettingsError as error:
        _fail(str(error), USAGE_ERROR)
    except (GatewayError, OSError, ValueError) as error:
        _fail(str(error))


@app.command()
def serve(
    repository: Optional[Path] = typer.Option(None, help="rendered repository; default: build the bundled model"),
    host: str = typer.Option("127.0.0.1"),
    http_port: int = typer.Option(8000),
    grpc_port: int = typer.Option(8001),
    metrics_port: int = typer.Option(8002),
    precision: Precision = typer.Option(Precision.fp32, help="precision of the default build (without --repository)"),
    gateway_port: Optional[int] = typer.Option(None, help="also serve the OpenAI-compatible gateway on this port"),
    api_keys: Optional[Path] = typer.Option(None, help="gateway API keys (JSON, hashed; see `tritonllm api-key`); "
                                                       "default: $TRITONLLM_API_KEYS, else no keys"),
    admin_key: Optional[str] = typer.Option(None, help=ADMIN_KEY_HELP),
    health_port: Optional[int] = typer.Option(None, help="serve /health/ready and /health/live (the supervisor's "
                                                          "checks, which run a real request) on this port"),
    supervise: bool = typer.Option(True, "--supervise/--no-supervise",
                                   help="check the server every 2 s with a real request; restart it when it fails"),
) -> None:
    """Start tritonserver on a repository (and the OpenAI gateway with --gateway-port); serve until Ctrl-C/SIGTERM."""
    _run_server(repository, host, http_port, grpc_port, metrics_port, precision, None, gateway_port, api_keys,
                admin_key, health_port, supervise)


@app.command()
def gateway(
    triton: str = typer.Option("127.0.0.1:8001", help="comma-separated gRPC host:port of the Triton replicas"),
    repository: Optional[Path] = typer.Option(None, help="the served repository (its tokenizer is read)"),
    tokenizer: Optional[Path] = typer.Option(None, help="tokenizer folder instead of --repository"),
    model: GatewayTarget = typer.Option(GatewayTarget(GatewaySettings.model),
                                        help="Triton model: auto (llm, the semantic cache whose cancellation stops "
                                             "the engine, where a replica serves it; else ensemble), ensemble, llm"),
    served_model_name: Optional[str] = typer.Option(None, help="the `model` clients name; default: the one the "
                                                              "repository was built with"),
    host: str = typer.Option(GatewaySettings.host),
    port: int = typer.Option(GatewaySettings.port),
    api_keys: Optional[Path] = typer.Option(None, help="API keys (JSON, hashed); default: $TRITONLLM_API_KEYS"),
) -> None:
    """Serve the OpenAI-compatible gateway alone, in front of running Triton replicas, until Ctrl-C or SIGTERM."""
    if (repository is None) == (tokenizer is None):
        _fail("give exactly one of --repository and --tokenizer (the served model's tokenizer folder)", USAGE_ERROR)
    urls = tuple(_parse_option("--triton", triton, _comma_list(allowed_text="comma-separated host:port")))
    stop = _StopSignals()
    server = _gateway_server(GatewaySettings(triton_grpc_urls=urls, model=model.value, host=host, port=port),
                             repository, tokenizer, api_keys, served_model_name)
    console.print(f"[green]OpenAI gateway[/] {server.url}/v1 -> {', '.join(urls)} ({model.value})\nCtrl-C stops it.")
    try:
        while not stop.wait(0.5) and server.is_running():
            pass
    finally:
        server.stop()


@app.command("api-key")
def api_key(
    tenant: str = typer.Option(..., help="the tenant every request with this key is served as"),
    requests_per_second: float = typer.Option(0.0, min=0, help="0: unlimited"),
    tokens_per_minute: int = typer.Option(0, min=0, help="prompt + completion tokens; 0: unlimited"),
) -> None:
    """Make a new API key: prints the key once (stdout) and the hashed entry for the keys file (stderr)."""
    import json

    from tritonllm.contract import SettingsError
    from tritonllm.gateway.auth import ApiKey, hash_key, new_key

    key = new_key()
    entry = ApiKey(hash_key(key), tenant, requests_per_second, tokens_per_minute)
    try:
        entry.validate("api-key")
    except SettingsError as error:
        _fail(str(error), USAGE_ERROR)
    console.print("add to the keys file's \"keys\" list (only the hash is stored):\n" + json.dumps(vars(entry)),
                  markup=False, highlight=False)
    print(key)


@app.command()
def demo(
    prompt: str = typer.Option(DEFAULT_PROMPT, help="chat prompt streamed once the server is ready"),
    host: str = typer.Option("127.0.0.1"),
    http_port: int = typer.Option(8000),
    grpc_port: int = typer.Option(8001),
    metrics_port: int = typer.Option(8002),
    admin_key: Optional[str] = typer.Option(None, help=ADMIN_KEY_HELP),
) -> None:
    """Main job: build the bundled model (cached), serve it, stream one chat answer, keep serving until Ctrl-C."""
    _run_server(None, host, http_port, grpc_port, metrics_port, Precision.fp32, prompt, admin_key=admin_key)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="prompt text"),
    url: Optional[str] = typer.Option(None, help="host:port; default 127.0.0.1:8001 (gRPC) or :8000 (HTTP)"),
    protocol: Protocol = typer.Option(Protocol.grpc),
    model: Model = typer.Option(Model.ensemble, help="ensemble, or llm (front model with the semantic cache)"),
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

    client = LLMClient(url or f"127.0.0.1:{8001 if protocol is Protocol.grpc else 8000}", protocol.value,
                       model.value)
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
    except Exception as error:
        if not client.reachable():
            _fail(f"cannot reach {client.url} over {protocol.value}: {error}")
        if isinstance(error, GenerationError):
            _fail(f"{model.value} at {client.url} ({protocol.value}) answered with an error: {error}")
        raise  # reachable, yet not an answer of the server: a bug worth its traceback


@app.command()
def bench(
    url: Optional[str] = typer.Option(None, help="gRPC host:port of a running server; default: start one here"),
    precision: Precision = typer.Option(Precision.fp32, help="precision of the server started here"),
    requests: int = typer.Option(64, min=1, help="requests per concurrency level (tritonllm)"),
    prompt_file: Optional[Path] = typer.Option(None, help="prompts (text lines or JSONL); default: synthetic"),
    min_prompt_tokens: int = typer.Option(100, min=1),
    max_prompt_tokens: int = typer.Option(200, min=1),
    output_tokens: int = typer.Option(64, min=1, help="fixed output length (min_tokens = max_tokens)"),
    concurrency: str = typer.Option("1,8,16", help="comma-separated client concurrency levels"),
    peers: str = typer.Option("hf-sequential,hf-static", help="comma-separated peers, or none"),
    peer_requests: int = typer.Option(16, min=1, help="requests per level for the (slow) peers"),
    out: Path = typer.Option(Path("bench-results"), help="folder for bench.json and bench.png"),
) -> None:
    """Measure tokens/s, TTFT, ITL and latency percentiles of the deployment and of its peers, side by side."""
    from tritonllm.client import bench as bench_lib
    from tritonllm.prompts import PromptFileError

    levels = _parse_option("--concurrency", concurrency, _levels)
    peer_names = [] if peers.strip() == "none" else _parse_option(
        "--peers", peers, _comma_list(tuple(bench_lib.PEERS), allowed_text=f"{', '.join(bench_lib.PEERS)}, none"))
    try:
        run = bench_lib.run(url=url, precision=precision.value, requests=requests, prompt_file=prompt_file,
                            min_prompt_tokens=min_prompt_tokens, max_prompt_tokens=max_prompt_tokens,
                            output_tokens=output_tokens, concurrency=levels, peers=peer_names,
                            peer_requests=peer_requests, out=out, console=console)
    except PromptFileError as error:
        _fail(f"--prompt-file: {error}", USAGE_ERROR)
    except bench_lib.BenchError as error:
        _fail(str(error))
    console.print(bench_lib.results_table(run.results))
    console.print(f"speedups of {run.results[0].system} (output tokens/s ratio): {run.meta['speedups']}")
    console.print(f"wrote {run.json_path} and {run.png_path}")


@app.command()
def perf(
    url: Optional[str] = typer.Option(None, help="gRPC host:port of a running server; default: start one here"),
    tool: Tool = typer.Option(Tool.perf_analyzer, help="perf_analyzer, or genai-perf (its own venv: "
                                                       "`make genai-perf-setup`)"),
    models: str = typer.Option("ensemble,llm", help="comma-separated: ensemble, llm (front model)"),
    concurrency: str = typer.Option("1,8", help="comma-separated client concurrency levels"),
    requests: int = typer.Option(32, min=1, help="requests per concurrency level"),
    prompt_file: Optional[Path] = typer.Option(None, help="prompts (text lines or JSONL); default: synthetic"),
    min_prompt_tokens: int = typer.Option(100, min=1, help="synthetic prompts: shortest, in tokens"),
    max_prompt_tokens: int = typer.Option(200, min=1, help="synthetic prompts: longest, in tokens"),
    output_tokens: int = typer.Option(64, min=1, help="fixed output length (min_tokens = max_tokens)"),
    llm_cache: LlmCache = typer.Option(LlmCache.bypass, help="`cache` input sent to llm: bypass (measure "
                                                             "generation) or use"),
    tokenizer: Optional[Path] = typer.Option(None, help="HF folder of the served model (synthetic prompts, "
                                                          "genai-perf's token counts); default: the bundled build's"),
    precision: Precision = typer.Option(Precision.fp32, help="precision of the server started here"),
    out: Path = typer.Option(Path("perf-results"), help="folder for inputs, the tool's own outputs and perf.json"),
) -> None:
    """Measure the ensemble and the front model with NVIDIA's tools (streaming over gRPC) at each concurrency."""
    from tritonllm.client import perf as perf_lib
    from tritonllm.client.genai_perf import GenaiPerfError
    from tritonllm.prompts import PromptFileError

    levels = _parse_option("--concurrency", concurrency, _levels)
    if requests < max(levels):
        _usage_error("--concurrency", concurrency, f"levels at most --requests ({requests})")
    model_names = _parse_option("--models", models, _comma_list(perf_lib.PERF_MODELS))
    try:
        run = perf_lib.run(url=url, tool=tool.value, models=model_names, concurrency=levels, requests=requests,
                           prompt_file=prompt_file, min_prompt_tokens=min_prompt_tokens,
                           max_prompt_tokens=max_prompt_tokens, output_tokens=output_tokens,
                           llm_cache=llm_cache.value, tokenizer=tokenizer, precision=precision.value, out=out,
                           console=console)
    except PromptFileError as error:
        _fail(f"--prompt-file: {error}", USAGE_ERROR)
    except (perf_lib.PerfAnalyzerError, GenaiPerfError) as error:
        _fail(str(error))
    console.print(perf_lib.perf_table(run.results, tool.value))
    console.print(f"wrote {run.json_path} (and the tool's own outputs per level in {out})")


@app.command()
def lint(repository: Path = typer.Argument(..., help="model repository to check")) -> None:
    """Check an (ops-edited) model repository before Triton loads it."""
    from tritonllm.builders.lint import format_findings, lint_repository

    findings = lint_repository(repository)
    if findings:
        console.print(format_findings(findings), markup=False, highlight=False)
    if any(finding.is_error for finding in findings):
        raise typer.Exit(1)
    console.print(f"[green]{repository}: no problems found[/]")


def _parse_option(option: str, text: str, parse: Callable[[str], list]) -> list:
    try:
        return parse(text)
    except typer.BadParameter as error:
        _fail(f"{option} {error.message}", USAGE_ERROR)


_NOT_ONE_OF = re.compile(r"^(?:Value error, )?'(?P<value>.*)' is not one of (?P<choices>.*?)\.?$")


def usage_error_line(error: Exception) -> str:
    """One line for a usage error of the option parser: the option, the value, and what is allowed."""
    param = getattr(error, "param", None)
    if param is None or not getattr(param, "opts", None) or type(error).__name__ == "MissingParameter":
        return error.format_message()  # e.g. "No such option: --bogus", "Missing argument 'REPOSITORY'."
    option = param.opts[0]
    message = getattr(error, "message", str(error)).removeprefix("Value error, ")
    choices = _NOT_ONE_OF.match(message)
    if choices:
        allowed = ", ".join(choice.strip().strip("'") for choice in choices["choices"].split(","))
        return f"{option} {choices['value']!r} is not allowed; allowed: {allowed}"
    cause = error.__cause__  # typer's pydantic ValidationError holds the value given
    value = cause.errors()[0].get("input") if hasattr(cause, "errors") and cause.errors() else None
    return f"{option} {value!r} is not allowed: {message}" if value is not None else f"{option} {message}"


def main() -> None:
    """Entry point: runs the app; usage errors become one line and exit code 2 instead of a help panel."""
    try:
        code = app(standalone_mode=False)
    except typer.Exit as done:
        code = done.exit_code
    except typer.Abort:
        code = 130
    except typer.TyperException as error:  # the option parser's errors: usage errors carry exit code 2
        code = getattr(error, "exit_code", FAILED)
        if type(error).__name__ == "NoArgsIsHelpError":
            error.show()  # `tritonllm` alone: the help text
            code = USAGE_ERROR
        else:
            line = usage_error_line(error) if code == USAGE_ERROR else error.format_message()
            console.print(f"[bold red]error:[/] {line}", markup=True, highlight=False, soft_wrap=True)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()

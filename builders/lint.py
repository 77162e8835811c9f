"""`tritonllm lint`: check a Triton model repository (rendered or hand-edited) before a server refuses it.

The ensemble rules follow tritonserver's own load-time checks (core `ensemble_utils.cc`, `model_config_utils.cc`):
every step input/output must be declared by the step's model, tensors must agree in data type and shape (-1 is a
wildcard), every ensemble tensor must be produced and used, a step may not mix outputs of different decoupled steps,
a step's `max_batch_size` may not be smaller than the ensemble's, and the response cache refuses decoupled models.
Beyond what Triton checks at load time: pieces of a stream handled by several instances must keep their order
(`preserve_ordering`), a model that streams another model's answer must itself be decoupled, path parameters must
lead to their files, and parameters follow the same rules as `tritonllm/contract.py`.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from tritonllm.contract import (CACHE_PARAMETERS, CALLED_MODEL_PARAMETER, DEFAULT_ENSEMBLE_GRPC_URL,
                                DRAFT_ONNX_PARAMETER, ENGINE_PARAMETERS, ENSEMBLE_URL_PARAMETER, PATH_PARAMETERS,
                                CacheSettings, EngineSettings, SettingsError, check_decoder_precision, decode_setting,
                                read_parameters)

Severity = Literal["error", "warning"]
CONFIG_FILE = "config.pbtxt"
_PLACEHOLDER = re.compile(r"\$\{(\w*)\}?")


@dataclass(frozen=True)
class Finding:
    """One problem: `file` is relative to the repository root; `message` says what is wrong and what is allowed."""

    file: str
    field: str
    message: str
    severity: Severity = "error"
    line: int | None = None

    @property
    def is_error(self) -> bool:
        return self.severity == "error"


def format_findings(findings: Collection[Finding]) -> str:
    """One line per finding (`severity file:line field: message`) and a count."""
    if not findings:
        return "no findings"
    lines = []
    for finding in findings:
        where = finding.file if finding.line is None else f"{finding.file}:{finding.line}"
        lines.append(f"{finding.severity:<7} {where} {finding.field}: {finding.message}")
    errors = sum(finding.is_error for finding in findings)
    lines.append(f"{errors} error(s), {len(findings) - errors} warning(s)")
    return "\n".join(lines)


def lint_repository(path: Path) -> list[Finding]:
    """All findings for the model repository at `path`: every model folder, then the models together."""
    path = Path(path)
    if not path.is_dir():
        return [Finding(str(path), "repository", "is not a folder; allowed: a Triton model repository folder")]
    findings: list[Finding] = []
    configs: dict[str, mc.ModelConfig] = {}
    unreadable: set[str] = set()
    for folder in sorted(entry for entry in path.iterdir() if entry.is_dir() and not entry.name.startswith(".")):
        config_path = folder / CONFIG_FILE
        file = f"{folder.name}/{CONFIG_FILE}"
        if not config_path.is_file():
            findings.append(Finding(file, CONFIG_FILE, "is missing; allowed: every model folder holds config.pbtxt"))
            unreadable.add(folder.name)
            continue
        try:
            text = config_path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            findings.append(Finding(file, CONFIG_FILE, f"is not UTF-8 ({error}); allowed: UTF-8 protobuf text"))
            unreadable.add(folder.name)
            continue
        config, text_findings = parse_config_text(text, file)
        findings += text_findings
        if config is None:
            unreadable.add(folder.name)
            continue
        configs[folder.name] = config
        findings += _check_model_folder(folder, config)
    findings += lint_model_configs(configs, unreadable)
    return findings


def parse_config_text(text: str, file: str) -> tuple[mc.ModelConfig | None, list[Finding]]:
    """Parse one config.pbtxt; findings for unfilled `${placeholders}` and for text that does not parse."""
    findings = [Finding(file, _field_on_line(line), f"still holds the template placeholder {match.group(0)}; "
                        "allowed: a concrete value (render the repository with `tritonllm build`)", line=number)
                for number, line in enumerate(text.splitlines(), start=1) for match in _PLACEHOLDER.finditer(line)]
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        findings.append(Finding(file, "(syntax)", f"does not parse as a Triton ModelConfig: {error}; allowed: "
                                "protobuf text format of model_config.proto", line=error.GetLine()))
        return None, findings
    return config, findings


def _field_on_line(line: str) -> str:
    parameter = re.search(r'key:\s*"([^"]*)"', line)
    if parameter:
        return f"parameters[{parameter.group(1)}]"
    name = re.search(r"(\w+)\s*:[^:]*\$\{", line)
    return name.group(1) if name else "(text)"


def lint_model_configs(configs: Mapping[str, mc.ModelConfig], unreadable: Collection[str] = ()) -> list[Finding]:
    """Findings that need only the parsed configs (keyed by model folder name); `unreadable` models exist but did
    not parse (already reported), so references to them are not reported again."""
    findings: list[Finding] = []
    for name, config in configs.items():
        file = f"{name}/{CONFIG_FILE}"
        if config.name and config.name != name:
            findings.append(Finding(file, "name", f"is {config.name!r} but the folder is {name!r}; allowed: the "
                                    "folder name (or no name)"))
        if config.response_cache.enable and _is_decoupled(name, configs):
            findings.append(Finding(file, "response_cache.enable", "is true on a decoupled model (or an ensemble "
                                    "with a decoupled step), which Triton refuses; allowed: false (the semantic "
                                    "cache in the front model covers streaming answers)"))
        findings += _check_parameters(name, config, configs)
        if config.HasField("ensemble_scheduling") or config.platform == "ensemble":
            findings += _check_ensemble(name, config, configs, unreadable)
        findings += _check_called_model(name, config, configs, unreadable)
    return findings


def _is_decoupled(name: str, configs: Mapping[str, mc.ModelConfig], seen: frozenset[str] = frozenset()) -> bool:
    """Decoupled by its policy or, for an ensemble, through any step (Triton makes such an ensemble decoupled)."""
    config = configs.get(name)
    if config is None or name in seen:
        return False
    if config.model_transaction_policy.decoupled:
        return True
    return any(_is_decoupled(step.model_name, configs, seen | {name})
               for step in config.ensemble_scheduling.step)


# --- model folders ---------------------------------------------------------------------------------------------------

def _check_model_folder(folder: Path, config: mc.ModelConfig) -> list[Finding]:
    name = folder.name
    versions = sorted((entry for entry in folder.iterdir() if entry.is_dir() and entry.name.isdigit()),
                      key=lambda entry: int(entry.name))
    if not versions:
        return [Finding(f"{name}/", "version folder", "no numeric version folder; allowed: at least one folder "
                        "named by an integer, e.g. 1/")]
    latest = versions[-1]  # Triton's default version policy serves the latest version
    findings = []
    if config.backend == "python":
        script = config.default_model_filename or "model.py"
        if not (latest / script).is_file():
            findings.append(Finding(f"{name}/{latest.name}/{script}", "backend", f"is missing; allowed: backend "
                                    f"\"python\" needs the model script {script} in the version folder"))
    for key, text in read_parameters(config).items():
        if key not in PATH_PARAMETERS and not (key == DRAFT_ONNX_PARAMETER and text):  # empty: no draft model
            continue
        target = latest / text
        holds = PATH_PARAMETERS.get(key, "")
        required = target / holds if holds else target
        if not text or not required.exists():
            needs = f"holding {holds}" if holds else "that exists"
            shown = required.relative_to(folder.parent) if required.is_relative_to(folder.parent) else required
            findings.append(Finding(f"{name}/{CONFIG_FILE}", f"parameters[{key}]", f"{text!r} does not lead to "
                                    f"{shown}; allowed: a path relative to {name}/{latest.name}/ {needs}"))
        elif key == "onnx_path" and "precision" in read_parameters(config):
            try:
                check_decoder_precision(required, read_parameters(config)["precision"])
            except (SettingsError, ValueError) as error:
                findings.append(Finding(f"{name}/{CONFIG_FILE}", "parameters[precision]", str(error)))
    parameters = read_parameters(config)
    if parameters.get("speculative_drafter") == "draft_model" and not parameters.get(DRAFT_ONNX_PARAMETER):
        findings.append(Finding(f"{name}/{CONFIG_FILE}", "parameters[speculative_drafter]",
                                f"'draft_model' needs parameters[{DRAFT_ONNX_PARAMETER}] (a draft model's graph, "
                                "`tritonllm build --draft int8|int4`); allowed without one: off, prompt_lookup"))
    return findings


# --- parameters ------------------------------------------------------------------------------------------------------

def _check_parameters(name: str, config: mc.ModelConfig, configs: Mapping[str, mc.ModelConfig]) -> list[Finding]:
    file = f"{name}/{CONFIG_FILE}"
    parameters = read_parameters(config)
    findings: list[Finding] = []
    if config.backend == "tensorrtllm":
        sources = {key: (f"parameters[{key}]", parameters[key])
                   for key in ("kv_cache_free_gpu_mem_fraction", "enable_kv_cache_reuse") if key in parameters}
        batching = config.dynamic_batching
        sources["max_queue_delay_microseconds"] = ("dynamic_batching.max_queue_delay_microseconds",
                                                   str(batching.max_queue_delay_microseconds))
        if batching.default_queue_policy.max_queue_size:
            sources["max_queue_size"] = ("dynamic_batching.default_queue_policy.max_queue_size",
                                         str(batching.default_queue_policy.max_queue_size))
        findings += _check_settings(file, EngineSettings, sources, kind="tensorrt_llm")
    elif "onnx_path" in parameters:
        sources = {key: (f"parameters[{key}]", parameters[key]) for key in ENGINE_PARAMETERS if key in parameters}
        findings += _check_settings(file, EngineSettings, sources, kind="onnxruntime")
    if any(key in parameters for key in CACHE_PARAMETERS):
        sources = {key: (f"parameters[{key}]", parameters[key]) for key in CACHE_PARAMETERS if key in parameters}
        findings += _check_settings(file, CacheSettings, sources)
    if "tokenizer_path" in parameters and "max_context_length" in parameters:
        findings += _check_context_length(file, parameters["max_context_length"], configs)
    return findings


def _check_settings(file: str, settings_type: type, sources: Mapping[str, tuple[str, str]],
                    **fixed: object) -> list[Finding]:
    """Decode each source (settings field -> (config field, text)) and run the settings' own validate()."""
    values, findings = {}, []
    for key, (field, text) in sources.items():
        try:
            values[key] = decode_setting(settings_type, key, text)
        except SettingsError as error:
            findings.append(Finding(file, field, str(error)))
    if findings:
        return findings
    try:
        settings_type(**values, **fixed).validate()
    except SettingsError as error:
        setting = str(error).split(" = ", 1)[0].rsplit(".", 1)[-1]  # "engine.max_batch_size = 0 ..." -> field
        field = sources[setting][0] if setting in sources else "parameters"
        findings.append(Finding(file, field, str(error)))
    return findings


def _check_context_length(file: str, text: str, configs: Mapping[str, mc.ModelConfig]) -> list[Finding]:
    """Tokenizer models check prompts against the context; it must be the engine's."""
    field = "parameters[max_context_length]"
    try:
        value = int(text)
    except ValueError:
        return [Finding(file, field, f"{text!r} is not an integer; allowed: the engine's max_context_length")]
    for engine_name, engine in configs.items():
        engine_parameters = read_parameters(engine)
        if "onnx_path" in engine_parameters and engine_parameters.get("max_context_length", str(value)) != str(value):
            return [Finding(file, field, f"is {value} but {engine_name} has max_context_length "
                            f"{engine_parameters['max_context_length']}; allowed: the same value as the engine")]
    return []


def _check_called_model(name: str, config: mc.ModelConfig, configs: Mapping[str, mc.ModelConfig],
                        unreadable: Collection[str]) -> list[Finding]:
    """A front model that streams a called model's answers must exist and be decoupled itself."""
    parameters = read_parameters(config)
    url = parameters.get(ENSEMBLE_URL_PARAMETER)
    if url is not None and not _is_host_port(url):
        return [Finding(f"{name}/{CONFIG_FILE}", f"parameters[{ENSEMBLE_URL_PARAMETER}]",
                        f"is {url!r}; allowed: HOST:PORT of this server's gRPC endpoint (port 1..65535), "
                        f"e.g. {DEFAULT_ENSEMBLE_GRPC_URL}")]
    callee = parameters.get(CALLED_MODEL_PARAMETER)
    if callee is None or callee in unreadable:
        return []
    file, field = f"{name}/{CONFIG_FILE}", f"parameters[{CALLED_MODEL_PARAMETER}]"
    if callee not in configs:
        return [Finding(file, field, f"names {callee!r}, which is not in the repository; allowed: one of "
                        f"{sorted(configs)}")]
    if _is_decoupled(callee, configs) and not config.model_transaction_policy.decoupled:
        return [Finding(file, "model_transaction_policy.decoupled", f"is false but the called model {callee!r} is "
                        "decoupled, so its streamed answer cannot be passed on; allowed: true")]
    return []


def _is_host_port(url: str) -> bool:
    host, _, port = url.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


# --- ensembles -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Tensor:
    data_type: int
    dims: tuple[int, ...]
    full_dims: tuple[int, ...]  # with the batch dimension when the declaring model batches
    origin: str

    def describe(self) -> str:
        return f"{mc.DataType.Name(self.data_type)} {list(self.dims)} ({self.origin})"


def _tensor(io: mc.ModelInput | mc.ModelOutput, batching: bool, origin: str, use_reshape: bool = False) -> _Tensor:
    dims = tuple(io.reshape.shape if use_reshape and io.HasField("reshape") else io.dims)
    return _Tensor(io.data_type, dims, ((-1,) if batching else ()) + dims, origin)


def _dims_agree(left: tuple[int, ...], right: tuple[int, ...]) -> bool:
    return len(left) == len(right) and all(a == b or -1 in (a, b) for a, b in zip(left, right))


def _consistency_problem(known: _Tensor, new: _Tensor) -> str | None:
    if known.data_type != new.data_type:
        return f"data type differs: {known.describe()} vs {new.describe()}; allowed: one data type along the ensemble"
    if not _dims_agree(known.dims, new.dims) and not _dims_agree(known.full_dims, new.full_dims):
        return f"shape differs: {known.describe()} vs {new.describe()}; allowed: equal dims, -1 matching any size"
    return None


def _check_ensemble(name: str, config: mc.ModelConfig, configs: Mapping[str, mc.ModelConfig],
                    unreadable: Collection[str]) -> list[Finding]:
    file = f"{name}/{CONFIG_FILE}"
    findings: list[Finding] = []

    def report(field: str, message: str, severity: Severity = "error") -> None:
        findings.append(Finding(file, field, message, severity))

    if config.platform != "ensemble":
        report("platform", f"is {config.platform!r}; allowed: \"ensemble\" for a model with ensemble_scheduling")
    if config.instance_group:
        report("instance_group", "is set; allowed: none on an ensemble (its steps have their own)")
    steps = config.ensemble_scheduling.step
    if not steps:
        report("ensemble_scheduling.step", "is empty; allowed: at least one step")
        return findings

    batching = config.max_batch_size > 0
    ensemble_inputs = {io.name for io in config.input}
    optional_inputs = {io.name for io in config.input if io.optional}
    tensors = {io.name: _tensor(io, batching, f"ensemble input {io.name}", use_reshape=True) for io in config.input}
    producers: dict[str, str] = {}  # ensemble tensor -> model of the step writing it
    consumers: dict[str, list[str]] = {}  # ensemble tensor -> fields of the input_maps reading it
    flow: list[tuple[str, list[str], list[str], bool]] = []  # per step: model, tensors read, written, decoupled

    for step in steps:
        model = step.model_name
        prefix = f"ensemble_scheduling.step[{model}]"
        for key, value in step.input_map.items():
            consumers.setdefault(value, []).append(f"{prefix}.input_map[{key}]")
        for key, value in step.output_map.items():
            if value in producers or value in ensemble_inputs:
                report(f"{prefix}.output_map[{key}]", f"writes {value!r}, which is already an ensemble input or "
                       "written by another step; allowed: one writer per ensemble tensor")
            else:
                producers[value] = model
        flow.append((model, list(step.input_map.values()), list(step.output_map.values()),
                     _is_decoupled(model, configs)))
        if model not in configs:
            if model not in unreadable:
                report(f"{prefix}.model_name", f"names {model!r}, which is not in the repository; allowed: one of "
                       f"{sorted(other for other in configs if other != name)}")
            continue
        findings += _check_step(file, config, step, configs[model], tensors, optional_inputs)

    ensemble_outputs = {io.name for io in config.output}
    for tensor, fields_reading in consumers.items():
        if tensor not in ensemble_inputs and tensor not in producers:
            for field in fields_reading:
                report(field, f"reads {tensor!r}, which no step writes and which is not an ensemble input; allowed: "
                       f"an ensemble input {sorted(ensemble_inputs)} or a step output")
    for io in config.output:
        field = f"output[{io.name}]"
        if io.name not in producers:
            report(field, "is written by no step; allowed: the value of some step's output_map")
        else:
            findings += _merge(tensors, io.name, _tensor(io, batching, f"ensemble output {io.name}",
                                                         use_reshape=True), file, field)
    for tensor in ensemble_inputs - consumers.keys():
        report(f"input[{tensor}]", "is read by no step, which Triton refuses; allowed: map it in some input_map or "
               "remove it")
    for tensor, model in producers.items():
        if tensor not in consumers and tensor not in ensemble_outputs:
            report(f"ensemble_scheduling.step[{model}].output_map", f"writes {tensor!r}, which nothing reads; Triton "
                   "refuses unused ensemble tensors; allowed: read it in a later step or drop the mapping")
    findings += _check_decoupled_flow(name, config, configs, ensemble_inputs, flow)
    return findings


def _check_step(file: str, ensemble: mc.ModelConfig, step: mc.ModelEnsembling.Step, step_config: mc.ModelConfig,
                tensors: dict[str, _Tensor], optional_inputs: set[str]) -> list[Finding]:
    """One step against its model's config: declared names, required inputs, batch size, types and shapes."""
    model = step.model_name
    prefix = f"ensemble_scheduling.step[{model}]"
    findings: list[Finding] = []
    if 0 < step_config.max_batch_size < ensemble.max_batch_size:
        findings.append(Finding(f"{model}/{CONFIG_FILE}", "max_batch_size", f"is {step_config.max_batch_size} but "
                                f"the ensemble {file} allows {ensemble.max_batch_size}; allowed: >= "
                                f"{ensemble.max_batch_size} (or 0)"))
    batching = step_config.max_batch_size > 0
    declared_inputs = {io.name: io for io in step_config.input}
    declared_outputs = {io.name: io for io in step_config.output}

    def check_map(kind: str, mapping: Mapping[str, str], declared: Mapping[str, Any]) -> None:
        """Each `kind` ("input"/"output") mapping: declared by the model, and consistent with the ensemble tensor."""
        for key, value in mapping.items():
            field = f"{prefix}.{kind}_map[{key}]"
            if key not in declared:
                mapped = f"maps {value!r} to input {key!r}" if kind == "input" else f"maps output {key!r}"
                to = "" if kind == "input" else f", to {value!r}"
                findings.append(Finding(file, field, f"{mapped}, which model {model!r} does not declare{to}; "
                                        f"allowed: one of {sorted(declared)}"))
                continue
            if kind == "input" and value in optional_inputs and not declared[key].optional:
                findings.append(Finding(file, field, f"feeds the optional ensemble input {value!r} to the required "
                                        f"input {key!r} of {model!r}; allowed: a required ensemble input, or mark "
                                        f"{key!r} optional"))
            findings.extend(_merge(tensors, value, _tensor(declared[key], batching, f"{model} {kind} {key}"), file,
                                   field))

    check_map("input", step.input_map, declared_inputs)
    for io in step_config.input:
        if io.name not in step.input_map and not io.optional:
            findings.append(Finding(file, f"{prefix}.input_map", f"does not map the required input {io.name!r} of "
                                    f"{model!r}; allowed: map it to an ensemble tensor, or mark it optional there"))
    check_map("output", step.output_map, declared_outputs)
    return findings


def _merge(tensors: dict[str, _Tensor], name: str, tensor: _Tensor, file: str, field: str) -> list[Finding]:
    """Record a tensor's type and shape as seen by one model; report it if another model sees it differently."""
    known = tensors.setdefault(name, tensor)
    problem = _consistency_problem(known, tensor) if known is not tensor else None
    return [Finding(file, field, f"ensemble tensor {name!r}: {problem}")] if problem else []


def _check_decoupled_flow(name: str, config: mc.ModelConfig, configs: Mapping[str, mc.ModelConfig],
                          ensemble_inputs: set[str], steps: list[tuple[str, list[str], list[str], bool]]
                          ) -> list[Finding]:
    """Each decoupled step starts a new response stream; a step may not read tensors of two different streams, and
    a step consuming a stream with several instances must keep the stream's order."""
    file = f"{name}/{CONFIG_FILE}"
    stream_of = {tensor: 0 for tensor in ensemble_inputs}  # 0: the request itself
    findings, pending, streams = [], list(steps), 0
    while pending:
        ready = [step for step in pending if all(tensor in stream_of for tensor in step[1])]
        if not ready:
            break  # the rest reads tensors nobody writes: reported above
        for model, reads, writes, decoupled in ready:
            pending.remove((model, reads, writes, decoupled))
            origins = {stream_of[tensor] for tensor in reads}
            if len(origins) > 1:
                findings.append(Finding(file, f"ensemble_scheduling.step[{model}].input_map", "reads tensors that "
                                        "come from different decoupled steps (or from a decoupled step and the "
                                        "request), which Triton refuses; allowed: inputs from one decoupled step "
                                        "only (an ensemble input goes through that step instead)"))
            step_config = configs.get(model)
            if (origins - {0} and not decoupled and step_config is not None
                    and sum(group.count or 1 for group in step_config.instance_group) > 1
                    and not step_config.dynamic_batching.preserve_ordering):
                findings.append(Finding(f"{model}/{CONFIG_FILE}", "dynamic_batching.preserve_ordering", "is off but "
                                        "several instances run the pieces of a decoupled step's stream, so they can "
                                        "reach the client out of order; allowed: true, or one instance"))
            if decoupled:
                streams += 1
            for tensor in writes:
                stream_of[tensor] = streams if decoupled else min(origins, default=0)
    if streams and config.HasField("model_transaction_policy") and not config.model_transaction_policy.decoupled:
        findings.append(Finding(file, "model_transaction_policy.decoupled", "is false but a step is decoupled: Triton "
                                "serves this ensemble as decoupled anyway, so clients must stream (gRPC streaming or "
                                "/generate_stream); allowed: true, or leave the policy out", "warning"))
    return findings

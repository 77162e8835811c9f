"""Render a deployable Triton model repository from `RepositorySettings`.

Every config is filled from typed values, parsed back with Triton's model-config protobuf and linted before anything
is written; the repository is assembled in a temporary sibling folder and renamed into place, so `out_dir` is either
the previous repository or a complete new one.
"""

from __future__ import annotations

import shutil
import string
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from tritonllm.paths import TEMPLATES_DIR

from .cache_calibration import resolve_threshold
from .files import atomic_dir, link_or_copy, link_tree
from .lint import CONFIG_FILE, Finding, format_findings, lint_model_configs, lint_repository, parse_config_text
from .model_config import (DRAFT_ONNX_FOLDER, EMBEDDER_FOLDER, ENGINE, ENSEMBLE, LLM, ONNX_FOLDER, POSTPROCESSING,
                           PREPROCESSING, TENSORRT_LLM, TOKENIZER_FOLDER, VERSION, engine_model_name,
                           template_values)
from tritonllm.contract import RepositorySettings, SettingsError

TEMPLATE_FILE = "config.pbtxt.template"
# Files of a Hugging Face folder the tokenizer models need (the folder also holds the weights, which they do not).
TOKENIZER_FILE_PATTERNS: tuple[str, ...] = (
    "tokenizer*.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
    "chat_template.*", "generation_config.json", "config.json")


class RepositoryRenderError(RuntimeError):
    """The rendered repository would not load or serve; `findings` says where and why."""

    def __init__(self, message: str, findings: Collection[Finding] = ()) -> None:
        super().__init__(message)
        self.findings = list(findings)


def render_repository(settings: RepositorySettings, out_dir: Path, templates_dir: Path = TEMPLATES_DIR) -> Path:
    """Write the model repository for `settings` to `out_dir` (replacing a repository already there) and return it.

    Raises SettingsError for out-of-range settings and RepositoryRenderError when a config would not load.
    """
    settings.validate()
    if settings.embedder_dir is not None and not Path(settings.embedder_dir).is_dir():
        raise SettingsError(f"embedder_dir = {settings.embedder_dir!r} is not allowed; allowed: a folder holding the "
                            "ONNX sentence embedder (or None to serve without the semantic cache)")
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    models = models_to_render(settings, templates_dir)
    if LLM in models:  # the cosine floor the front model is rendered with: the operator's, or derived from the budget
        settings = replace(settings, cache=resolve_threshold(settings.cache, Path(settings.embedder_dir))[0])
    texts = {model: _fill_template(templates_dir / model / TEMPLATE_FILE, template_values(model, settings))
             for model in models}
    configs, findings = {}, []
    for model, text in texts.items():
        configs[model], text_findings = parse_config_text(text, f"{model}/{CONFIG_FILE}")
        findings += text_findings
    if findings:
        raise RepositoryRenderError(f"rendered configs do not parse or hold placeholders:\n"
                                    f"{format_findings(findings)}", findings)
    engine = engine_model_name(settings)
    if engine == TENSORRT_LLM and _drop_undeclared_mappings(configs[ENSEMBLE], engine, configs):
        texts[ENSEMBLE] = (f"# Rendered by tritonllm from {ENSEMBLE}/{TEMPLATE_FILE} for the {engine} engine.\n"
                           + text_format.MessageToString(configs[ENSEMBLE], as_utf8=True))
    _raise_on_errors(lint_model_configs(configs), "the rendered configs")

    with atomic_dir(out_dir) as staging:  # a repository already there is replaced only by a whole new one
        for model, text in texts.items():
            _write_model(staging / model, text, templates_dir / model, _artifacts(model, settings))
        _raise_on_errors(lint_repository(staging), "the assembled repository")
    return out_dir


def models_to_render(settings: RepositorySettings, templates_dir: Path = TEMPLATES_DIR) -> list[str]:
    """Tokenizer, engine, detokenizer and ensemble always; the front model with the semantic cache when the cache is
    on, an embedder is given and the front model's adapter exists."""
    models = [PREPROCESSING, engine_model_name(settings), POSTPROCESSING, ENSEMBLE]
    if (settings.cache.enabled and settings.embedder_dir is not None
            and (templates_dir / LLM / VERSION / "model.py").is_file()):
        models.append(LLM)
    return models


def _fill_template(template_path: Path, values: dict[str, str]) -> str:
    template = string.Template(template_path.read_text(encoding="utf-8"))
    if not template.is_valid():
        raise RepositoryRenderError(f"{template_path} holds a '$' that is not a ${{name}} placeholder")
    expected = set(template.get_identifiers())
    if expected != values.keys():
        raise RepositoryRenderError(
            f"{template_path} and builders/model_config.py disagree: placeholders without a value: "
            f"{sorted(expected - values.keys())}, values without a placeholder: {sorted(values.keys() - expected)}")
    return template.substitute(values)


def _drop_undeclared_mappings(ensemble: mc.ModelConfig, step_model: str, configs: dict[str, mc.ModelConfig]) -> bool:
    """Remove the `step_model` step's mappings of tensors that model does not declare: outputs with the optional
    inputs they fed (TensorRT-LLM sends no stream_context_length/stream_final), and inputs it does not take (tenant;
    with that engine the ensemble does not offer it: model_config.ensemble_inputs). Returns whether anything was
    removed."""
    declared = {io.name for io in configs[step_model].output}
    declared_inputs = {io.name for io in configs[step_model].input}
    dropped: set[str] = set()
    unread: set[str] = set()  # an input mapped to a tensor the step does not take (the ensemble does not offer it)
    for step in ensemble.ensemble_scheduling.step:
        if step.model_name == step_model:
            for key in [key for key in step.output_map if key not in declared]:
                dropped.add(step.output_map.pop(key))
            for key in [key for key in step.input_map if key not in declared_inputs]:
                unread.add(step.input_map.pop(key))
    for step in ensemble.ensemble_scheduling.step:
        optional = {io.name for io in configs[step.model_name].input if io.optional} if step.model_name in configs \
            else set()
        for key in [key for key, value in step.input_map.items() if value in dropped and key in optional]:
            del step.input_map[key]
    return bool(dropped or unread)


def _raise_on_errors(findings: list[Finding], what: str) -> None:
    if any(finding.is_error for finding in findings):
        raise RepositoryRenderError(f"lint found problems in {what}:\n{format_findings(findings)}", findings)


def _artifacts(model: str, settings: RepositorySettings) -> list[tuple[Path, str, tuple[str, ...]]]:
    """(source folder, folder inside the version folder, file patterns or () for everything) per model."""
    if model in (PREPROCESSING, POSTPROCESSING):
        return [(Path(settings.tokenizer_dir), TOKENIZER_FOLDER, TOKENIZER_FILE_PATTERNS)]
    if model == ENGINE:  # its tokenizer compiles structured-output grammars
        return [(Path(settings.onnx_dir), ONNX_FOLDER, ()),
                (Path(settings.tokenizer_dir), TOKENIZER_FOLDER, TOKENIZER_FILE_PATTERNS),
                *([(Path(settings.draft_onnx_dir), DRAFT_ONNX_FOLDER, ())] if settings.draft_onnx_dir else [])]
    if model == LLM:
        return [(Path(settings.embedder_dir), EMBEDDER_FOLDER, ())]
    return []


def _write_model(folder: Path, config_text: str, template_folder: Path,
                 artifacts: list[tuple[Path, str, tuple[str, ...]]]) -> None:
    version = folder / VERSION
    adapter_folder = template_folder / VERSION
    if adapter_folder.is_dir():  # the Python adapter (model.py and any helpers); tensorrt_llm and ensemble have none
        shutil.copytree(adapter_folder, version, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    version.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(config_text, encoding="utf-8")
    for source, target, patterns in artifacts:
        if patterns:
            destination = version / target
            destination.mkdir()
            for file in sorted({path for pattern in patterns for path in source.glob(pattern) if path.is_file()}):
                link_or_copy(file, destination / file.name)
        else:
            link_tree(source, version / target)


def _check_replaceable(out_dir: Path) -> None:
    """Only an empty folder or a model repository may be replaced: never delete a folder of something else."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir() or any(not (entry.is_dir() and (entry / CONFIG_FILE).is_file())
                                   for entry in out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not a model repository (only folders holding config.pbtxt); "
                              "allowed: a new or empty folder, or a repository rendered before")


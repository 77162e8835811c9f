"""`tritonllm lint` finds each kind of broken repository and names the file, the field and what is allowed."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from support import FIXED_FLOOR, make_artifacts
from tritonllm.builders.lint import Finding, format_findings, lint_model_configs, lint_repository
from tritonllm.builders.repository import render_repository
from tritonllm.contract import CALLED_MODEL_PARAMETER, CacheSettings, EngineSettings, RepositorySettings


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rendered")
    settings = RepositorySettings(**make_artifacts(root / "build"), cache=FIXED_FLOOR)
    return render_repository(settings, root / "repository")


@pytest.fixture
def repository(rendered: Path, tmp_path: Path) -> Path:
    """A private copy of the clean repository to break."""
    return Path(shutil.copytree(rendered, tmp_path / "repository"))


def edit_config(repository: Path, model: str, change: Callable[[mc.ModelConfig], None]) -> None:
    path = repository / model / "config.pbtxt"
    config = text_format.Parse(path.read_text(), mc.ModelConfig())
    change(config)
    path.write_text(text_format.MessageToString(config))


def step(config: mc.ModelConfig, model: str) -> mc.ModelEnsembling.Step:
    return next(step for step in config.ensemble_scheduling.step if step.model_name == model)


def declared(ios, name: str):
    return next(io for io in ios if io.name == name)


def rename_key(model: str, mapping: str, old: str, new: str) -> Callable[[mc.ModelConfig], None]:
    def change(config: mc.ModelConfig) -> None:
        keys = getattr(step(config, model), mapping)
        keys[new] = keys.pop(old)
    return change


def map_input(model: str, key: str, tensor: str) -> Callable[[mc.ModelConfig], None]:
    def change(config: mc.ModelConfig) -> None:
        step(config, model).input_map[key] = tensor
    return change


def unmap_input(model: str, key: str) -> Callable[[mc.ModelConfig], None]:
    return lambda config: step(config, model).input_map.pop(key)


def several_unordered_instances(config: mc.ModelConfig) -> None:
    config.instance_group[0].count = 2
    config.dynamic_batching.preserve_ordering = False


def set_parameter(key: str, value: str) -> Callable[[mc.ModelConfig], None]:
    return lambda config: config.parameters[key].MergeFrom(mc.ModelParameter(string_value=value))


def append_text(model: str, text: str) -> Callable[[Path], None]:
    def change(repository: Path) -> None:
        path = repository / model / "config.pbtxt"
        path.write_text(path.read_text() + text)
    return change


def replace_text(model: str, old: str, new: str) -> Callable[[Path], None]:
    def change(repository: Path) -> None:
        path = repository / model / "config.pbtxt"
        assert old in path.read_text()
        path.write_text(path.read_text().replace(old, new))
    return change


def edit(model: str, change: Callable[[mc.ModelConfig], None]) -> Callable[[Path], None]:
    return lambda repository: edit_config(repository, model, change)


BROKEN = {
    "config does not parse": (append_text("postprocessing", "input [ { name: \n"),
                              "postprocessing/config.pbtxt", "(syntax)"),
    "no version folder": (lambda repository: shutil.rmtree(repository / "engine" / "1"),
                          "engine/", "version folder"),
    "python model without model.py": (lambda repository: (repository / "preprocessing" / "1" / "model.py").unlink(),
                                      "preprocessing/1/model.py", "backend"),
    "mapping to an undeclared input": (
        edit("ensemble", rename_key("engine", "input_map", "input_ids", "input_token_ids")),
        "ensemble/config.pbtxt", "step[engine].input_map[input_token_ids]"),
    "mapping from an undeclared output": (
        edit("ensemble", rename_key("postprocessing", "output_map", "OUTPUT", "TEXT")),
        "ensemble/config.pbtxt", "step[postprocessing].output_map[TEXT]"),
    "tensor no step writes": (
        edit("ensemble", map_input("postprocessing", "TOKENS_BATCH", "_IDS")),
        "ensemble/config.pbtxt", "step[postprocessing].input_map[TOKENS_BATCH]"),
    "data type mismatch": (
        edit("engine", lambda config: setattr(declared(config.input, "input_lengths"), "data_type", mc.TYPE_INT64)),
        "ensemble/config.pbtxt", "step[engine].input_map[input_lengths]"),
    "shape mismatch": (
        edit("engine", lambda config: declared(config.input, "stop_words_list").dims.__setitem__(0, 3)),
        "ensemble/config.pbtxt", "step[engine].input_map[stop_words_list]"),
    "decoupled model with response cache": (
        edit("engine", lambda config: setattr(config.response_cache, "enable", True)),
        "engine/config.pbtxt", "response_cache.enable"),
    "step model missing": (lambda repository: shutil.rmtree(repository / "postprocessing"),
                           "ensemble/config.pbtxt", "step[postprocessing].model_name"),
    "parameter out of range": (edit("engine", set_parameter("prefill_group_ratio", "9.5")),
                               "engine/config.pbtxt", "parameters[prefill_group_ratio]"),
    "parameter not a number": (edit("engine", set_parameter("max_queue_size", "lots")),
                               "engine/config.pbtxt", "parameters[max_queue_size]"),
    "parameters inconsistent with each other": (edit("engine", set_parameter("kv_cache_max_tokens", "1024")),
                                                "engine/config.pbtxt", "parameters[kv_cache_max_tokens]"),
    "context length differs from the engine's": (edit("preprocessing", set_parameter("max_context_length", "4096")),
                                                 "preprocessing/config.pbtxt", "parameters[max_context_length]"),
    "path parameter leads nowhere": (
        lambda repository: shutil.rmtree(repository / "postprocessing" / "1" / "tokenizer"),
        "postprocessing/config.pbtxt", "parameters[tokenizer_path]"),
    "placeholder left": (replace_text("engine", '"max_queue_size" value { string_value: "128" }',
                                      '"max_queue_size" value { string_value: "${max_queue_size}" }'),
                         "engine/config.pbtxt", "parameters[max_queue_size]"),
    "step batches less than the ensemble": (edit("engine", lambda config: setattr(config, "max_batch_size", 8)),
                                            "engine/config.pbtxt", "max_batch_size"),
    "step mixes decoupled and request tensors": (
        edit("ensemble", map_input("postprocessing", "STREAM_FINAL", "stream")),
        "ensemble/config.pbtxt", "step[postprocessing].input_map"),
    "streamed pieces may reorder": (
        edit("postprocessing", several_unordered_instances),
        "postprocessing/config.pbtxt", "dynamic_batching.preserve_ordering"),
    "shared cache address not a Redis URL": (edit("llm", set_parameter("redis_url", "http://cache:6379")),
                                             "llm/config.pbtxt", "parameters[redis_url]"),
    "front model's gRPC address not HOST:PORT": (edit("llm", set_parameter("ensemble_grpc_url", "localhost")),
                                                "llm/config.pbtxt", "parameters[ensemble_grpc_url]"),
    "traffic capture without a size bound": (edit("llm", set_parameter("capture_max_bytes", "0")),
                                             "llm/config.pbtxt", "parameters[capture_max_bytes]"),
    "draft model drafter without a draft model": (edit("engine", set_parameter("speculative_drafter", "draft_model")),
                                                  "engine/config.pbtxt", "parameters[speculative_drafter]"),
    "draft model path leads nowhere": (edit("engine", set_parameter("draft_onnx_path", "draft_onnx/model.onnx")),
                                       "engine/config.pbtxt", "parameters[draft_onnx_path]"),
    "required step input left unmapped": (
        edit("ensemble", unmap_input("engine", "request_output_len")),
        "ensemble/config.pbtxt", "step[engine].input_map"),
}


def test_rendered_repository_is_clean(rendered):
    assert lint_repository(rendered) == []
    assert format_findings([]) == "no findings"


@pytest.mark.parametrize("fault", BROKEN, ids=list(BROKEN))
def test_lint_finds_the_fault(repository, fault):
    breaks, file, field = BROKEN[fault]
    breaks(repository)
    findings = lint_repository(repository)

    matching = [finding for finding in findings if finding.file == file and field in finding.field]
    assert matching, format_findings(findings)
    assert all(finding.is_error and "allowed" in finding.message for finding in matching)
    assert file in format_findings(findings)


def test_parse_errors_carry_the_line_and_do_not_cascade(repository):
    append_text("postprocessing", "input [ { name: \n")(repository)
    findings = lint_repository(repository)

    assert [(finding.file, finding.field) for finding in findings] == [("postprocessing/config.pbtxt", "(syntax)")]
    assert findings[0].line == len((repository / "postprocessing" / "config.pbtxt").read_text().splitlines()) + 1


def test_placeholder_finding_names_the_line(repository):
    replace_text("engine", "max_batch_size: 64", "max_batch_size: ${triton_max_batch_size}")(repository)
    findings = [finding for finding in lint_repository(repository) if finding.file == "engine/config.pbtxt"]

    placeholder = next(finding for finding in findings if "${triton_max_batch_size}" in finding.message)
    lines = (repository / "engine" / "config.pbtxt").read_text().splitlines()
    assert placeholder.field == "max_batch_size"
    assert "${triton_max_batch_size}" in lines[placeholder.line - 1]
    assert f"engine/config.pbtxt:{placeholder.line} max_batch_size" in format_findings(findings)


def test_explicitly_not_decoupled_ensemble_with_a_decoupled_step_is_a_warning(repository):
    edit("ensemble", lambda config: setattr(config.model_transaction_policy, "decoupled", False))(repository)
    findings = lint_repository(repository)

    assert [(finding.field, finding.severity) for finding in findings] == [
        ("model_transaction_policy.decoupled", "warning")]


def test_front_model_streaming_a_decoupled_ensemble_must_be_decoupled(rendered):
    configs = {entry.name: text_format.Parse((entry / "config.pbtxt").read_text(), mc.ModelConfig())
               for entry in rendered.iterdir()}
    front = mc.ModelConfig(name="front", backend="python", max_batch_size=64)
    front.parameters[CALLED_MODEL_PARAMETER].string_value = "ensemble"

    assert lint_model_configs({**configs, "front": front}) == [Finding(
        "front/config.pbtxt", "model_transaction_policy.decoupled",
        "is false but the called model 'ensemble' is decoupled, so its streamed answer cannot be passed on; "
        "allowed: true")]
    front.parameters[CALLED_MODEL_PARAMETER].string_value = "gone"
    assert [finding.field for finding in lint_model_configs({**configs, "front": front})] == [
        f"parameters[{CALLED_MODEL_PARAMETER}]"]


def test_tensorrt_llm_parameters_are_checked(tmp_path):
    artifacts = make_artifacts(tmp_path / "build")
    settings = RepositorySettings(tokenizer_dir=artifacts["tokenizer_dir"], trtllm_engine_dir="/engines/smollm2",
                                  engine=EngineSettings(kind="tensorrt_llm"), cache=CacheSettings(enabled=False))
    repository = render_repository(settings, tmp_path / "repository")
    edit_config(repository, "tensorrt_llm", set_parameter("kv_cache_free_gpu_mem_fraction", "1.5"))

    assert [(finding.file, finding.field) for finding in lint_repository(repository)] == [
        ("tensorrt_llm/config.pbtxt", "parameters[kv_cache_free_gpu_mem_fraction]")]

"""Rendering the Triton model repository from settings; configs are checked with Triton's model-config protobuf, no
server needed."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from support import FIXED_FLOOR, make_artifacts
from tritonclient.grpc import model_config_pb2 as mc

from tritonllm.builders.lint import lint_repository
from tritonllm.builders.model_config import ENGINE, ENSEMBLE, LLM, POSTPROCESSING, PREPROCESSING, TENSORRT_LLM
from tritonllm.builders.repository import RepositoryRenderError, models_to_render, render_repository
from tritonllm.contract import (CALLED_MODEL_PARAMETER, CacheSettings, EngineSettings, RepositorySettings,
                                SettingsError, read_parameters, settings_from_parameters)
from tritonllm.paths import TEMPLATES_DIR

# The ensemble (and front model) contract of docs/architecture.md: name -> (data type, dims, optional).
ENSEMBLE_INPUTS = {
    # required by the contract, declared optional so preprocessing can refuse a request lacking them (see template)
    "text_input": ("TYPE_STRING", [1], True), "max_tokens": ("TYPE_INT32", [1], True),
    "stream": ("TYPE_BOOL", [1], True), "exclude_input_in_output": ("TYPE_BOOL", [1], True),
    "temperature": ("TYPE_FP32", [1], True), "top_p": ("TYPE_FP32", [1], True), "top_k": ("TYPE_INT32", [1], True),
    "end_id": ("TYPE_INT32", [1], True), "pad_id": ("TYPE_INT32", [1], True),
    "min_tokens": ("TYPE_INT32", [1], True), "stop_words": ("TYPE_STRING", [-1], True),
    "bad_words": ("TYPE_STRING", [-1], True), "seed": ("TYPE_UINT64", [1], True),
    "apply_chat_template": ("TYPE_BOOL", [1], True), "tenant": ("TYPE_STRING", [1], True),
    **{name: ("TYPE_STRING", [1], True)
       for name in ("guided_json", "guided_regex", "guided_grammar", "guided_choice", "speculative")}}
ENSEMBLE_OUTPUTS = {"text_output": ("TYPE_STRING", [-1], False)}


def load_config(repository: Path, model: str) -> mc.ModelConfig:
    return text_format.Parse((repository / model / "config.pbtxt").read_text(), mc.ModelConfig())


def contract(ios) -> dict[str, tuple[str, list[int], bool]]:
    return {io.name: (mc.DataType.Name(io.data_type), list(io.dims), getattr(io, "optional", False)) for io in ios}


@pytest.fixture
def artifacts(tmp_path: Path) -> dict[str, Path]:
    return make_artifacts(tmp_path / "build")


def test_rendered_repository_parses_lints_clean_and_holds_the_artifacts(artifacts, tmp_path):
    settings = RepositorySettings(**artifacts, cache=FIXED_FLOOR)
    repository = render_repository(settings, tmp_path / "repository")

    expected = {PREPROCESSING, ENGINE, POSTPROCESSING, ENSEMBLE} | (
        {LLM} if (TEMPLATES_DIR / LLM / "1" / "model.py").is_file() else set())
    assert {entry.name for entry in repository.iterdir()} == expected
    for model in expected:
        text = (repository / model / "config.pbtxt").read_text()
        assert "${" not in text
        assert load_config(repository, model).name == model
        assert (repository / model / "1").is_dir()
    assert lint_repository(repository) == []
    assert not [entry for entry in tmp_path.iterdir() if entry.name.startswith(".")]  # no staging folder left

    for model in expected - {ENSEMBLE}:
        adapter = repository / model / "1" / "model.py"
        assert adapter.read_bytes() == (TEMPLATES_DIR / model / "1" / "model.py").read_bytes()
    for model in (PREPROCESSING, POSTPROCESSING):
        tokenizer_files = {entry.name for entry in (repository / model / "1" / "tokenizer").iterdir()}
        assert tokenizer_files == {"tokenizer.json", "generation_config.json"}
    onnx_copy = repository / ENGINE / "1" / "onnx" / "model.onnx"
    assert os.stat(onnx_copy).st_ino == os.stat(artifacts["onnx_dir"] / "model.onnx").st_ino  # hard link, same fs
    onnx.checker.check_model(str(onnx_copy))


def test_parameters_read_back_into_the_same_settings(artifacts, tmp_path):
    engine = EngineSettings(precision="int8", max_batch_size=8, max_queue_size=32, kv_cache_max_tokens=8192,
                            max_context_length=1024, prefill_chunk_tokens=128, prefill_group_ratio=1.5,
                            intra_op_threads=2)
    cache = CacheSettings(similarity_threshold=0.9, ttl_seconds=60.0, persist_path="/var/cache/llm")
    settings = RepositorySettings(**artifacts, engine=engine, cache=cache, max_request_batch_size=32,
                                  preprocessing_instances=2, postprocessing_instances=3)
    repository = render_repository(settings, tmp_path / "repository")

    engine_config = load_config(repository, ENGINE)
    assert settings_from_parameters(EngineSettings, read_parameters(engine_config), kind="onnxruntime") == engine
    assert read_parameters(engine_config)["onnx_path"] == "onnx/model.onnx"
    assert read_parameters(engine_config)["draft_onnx_path"] == ""  # built without a draft model
    assert engine_config.model_transaction_policy.decoupled
    for model, instances in ((PREPROCESSING, 2), (POSTPROCESSING, 3)):
        config = load_config(repository, model)
        assert config.max_batch_size == 32
        groups = [(group.count, group.kind) for group in config.instance_group]
        assert groups == [(instances, mc.ModelInstanceGroup.KIND_CPU)]
        served = {"served_model_name": settings.served_model_name} if model == PREPROCESSING else {}
        assert read_parameters(config) == {"tokenizer_path": "tokenizer", "max_context_length": "1024", **served}
        assert not config.model_transaction_policy.decoupled
    if (repository / LLM).is_dir():
        llm = load_config(repository, LLM)
        assert settings_from_parameters(CacheSettings, read_parameters(llm)) == cache
        assert read_parameters(llm)[CALLED_MODEL_PARAMETER] == ENSEMBLE
        assert llm.model_transaction_policy.decoupled
        front_inputs = {**ENSEMBLE_INPUTS, "text_input": ("TYPE_STRING", [1], False),
                        "max_tokens": ("TYPE_INT32", [1], False), "tenant": ("TYPE_STRING", [1], True),
                        "cache": ("TYPE_STRING", [1], True)}
        front_outputs = {**ENSEMBLE_OUTPUTS, "cache_hit": ("TYPE_BOOL", [1], False),
                         "cache_similarity": ("TYPE_FP32", [1], False)}
        assert (contract(llm.input), contract(llm.output)) == (front_inputs, front_outputs)


def test_ensemble_keeps_the_tensorrtllm_backend_contract_and_mapping(artifacts, tmp_path):
    repository = render_repository(RepositorySettings(**artifacts, cache=FIXED_FLOOR), tmp_path / "repository")
    ensemble = load_config(repository, ENSEMBLE)

    assert (contract(ensemble.input), contract(ensemble.output)) == (ENSEMBLE_INPUTS, ENSEMBLE_OUTPUTS)
    assert ensemble.platform == "ensemble" and not ensemble.instance_group
    steps = {step.model_name: step for step in ensemble.ensemble_scheduling.step}
    assert list(steps) == [PREPROCESSING, ENGINE, POSTPROCESSING]
    assert dict(steps[PREPROCESSING].input_map) == {
        "QUERY": "text_input", "REQUEST_OUTPUT_LEN": "max_tokens", "STOP_WORDS_DICT": "stop_words",
        "BAD_WORDS_DICT": "bad_words", "END_ID": "end_id", "PAD_ID": "pad_id",
        "APPLY_CHAT_TEMPLATE": "apply_chat_template"}
    produced = {key: value for key, value in steps[PREPROCESSING].output_map.items()}
    engine_inputs = dict(steps[ENGINE].input_map)
    for output, engine_input in {"INPUT_ID": "input_ids", "REQUEST_INPUT_LEN": "input_lengths",
                                 "OUT_REQUEST_OUTPUT_LEN": "request_output_len", "OUT_END_ID": "end_id",
                                 "OUT_PAD_ID": "pad_id", "STOP_WORDS_IDS": "stop_words_list",
                                 "BAD_WORDS_IDS": "bad_words_list"}.items():
        assert engine_inputs[engine_input] == produced[output]
    for request_input, engine_input in {"top_k": "runtime_top_k", "top_p": "runtime_top_p",
                                        "temperature": "temperature", "seed": "random_seed",
                                        "min_tokens": "min_length", "stream": "streaming",
                                        "exclude_input_in_output": "exclude_input_in_output"}.items():
        assert engine_inputs[engine_input] == request_input
    assert engine_inputs["tenant"] == "tenant"  # prefix reuse is scoped to the request's tenant
    engine_outputs = dict(steps[ENGINE].output_map)
    post_inputs = dict(steps[POSTPROCESSING].input_map)
    for engine_output, post_input in {"output_ids": "TOKENS_BATCH", "sequence_length": "SEQUENCE_LENGTH",
                                      "stream_context_length": "STREAM_CONTEXT_LENGTH",
                                      "stream_final": "STREAM_FINAL"}.items():
        assert post_inputs[post_input] == engine_outputs[engine_output]
    assert dict(steps[POSTPROCESSING].output_map) == {"OUTPUT": "text_output"}


def test_tensorrt_llm_engine_replaces_the_engine_step(artifacts, tmp_path):
    settings = RepositorySettings(tokenizer_dir=artifacts["tokenizer_dir"], trtllm_engine_dir="/engines/smollm2-fp8",
                                  engine=EngineSettings(kind="tensorrt_llm", kv_cache_free_gpu_mem_fraction=0.8,
                                                        enable_kv_cache_reuse=False,
                                                        max_queue_delay_microseconds=500),
                                  cache=CacheSettings(enabled=False))
    repository = render_repository(settings, tmp_path / "repository")

    assert {entry.name for entry in repository.iterdir()} == {PREPROCESSING, TENSORRT_LLM, POSTPROCESSING, ENSEMBLE}
    assert lint_repository(repository) == []
    trtllm = load_config(repository, TENSORRT_LLM)
    assert (trtllm.backend, trtllm.model_transaction_policy.decoupled) == ("tensorrtllm", True)
    assert not list((repository / TENSORRT_LLM / "1").iterdir())  # C++ backend: empty version folder, no adapter
    parameters = read_parameters(trtllm)
    assert {key: parameters[key] for key in ("gpt_model_type", "gpt_model_path", "batch_scheduler_policy",
                                             "kv_cache_free_gpu_mem_fraction", "enable_kv_cache_reuse",
                                             "exclude_input_in_output")} == {
        "gpt_model_type": "inflight_fused_batching", "gpt_model_path": "/engines/smollm2-fp8",
        "batch_scheduler_policy": "guaranteed_no_evict", "kv_cache_free_gpu_mem_fraction": "0.8",
        "enable_kv_cache_reuse": "false", "exclude_input_in_output": "false"}
    assert trtllm.dynamic_batching.max_queue_delay_microseconds == 500
    assert parameters["max_attention_window_size"] == "2048"  # no sliding layers: one window, the whole context
    windowed = replace(settings, trtllm_attention_windows=(512, 512, 2048))
    assert read_parameters(load_config(render_repository(windowed, tmp_path / "windowed"), TENSORRT_LLM))[
        "max_attention_window_size"] == "512,512,2048"
    with pytest.raises(SettingsError, match=r"trtllm_attention_windows = \(512, 4096\) is not allowed; allowed: "
                                            r"with the tensorrt_llm engine, one window per layer in 1..2048"):
        render_repository(replace(settings, trtllm_attention_windows=(512, 4096)), tmp_path / "too-wide")

    ensemble = load_config(repository, ENSEMBLE)
    # TensorRT-LLM takes no tenant (its own KV reuse is not scoped by tenant), no guided_* inputs (the ONNX
    # engine's structured output) and no speculative (its drafter): the ensemble does not offer them.
    onnx_only = {"tenant", "guided_json", "guided_regex", "guided_grammar", "guided_choice", "speculative"}
    without_onnx_only = {name: value for name, value in ENSEMBLE_INPUTS.items() if name not in onnx_only}
    assert (contract(ensemble.input), contract(ensemble.output)) == (without_onnx_only, ENSEMBLE_OUTPUTS)
    steps = {step.model_name: step for step in ensemble.ensemble_scheduling.step}
    assert list(steps) == [PREPROCESSING, TENSORRT_LLM, POSTPROCESSING]
    assert not onnx_only & set(steps[TENSORRT_LLM].input_map)
    assert set(steps[TENSORRT_LLM].output_map) == {"output_ids", "sequence_length"}
    assert set(steps[POSTPROCESSING].input_map) == {"TOKENS_BATCH", "SEQUENCE_LENGTH"}


def test_front_model_needs_cache_embedder_and_adapter(artifacts, tmp_path):
    with_embedder = RepositorySettings(**artifacts)
    without_embedder = RepositorySettings(tokenizer_dir=artifacts["tokenizer_dir"], onnx_dir=artifacts["onnx_dir"])
    cache_off = RepositorySettings(**artifacts, cache=CacheSettings(enabled=False))
    adapter_written = (TEMPLATES_DIR / LLM / "1" / "model.py").is_file()

    assert (LLM in models_to_render(with_embedder)) == adapter_written
    assert LLM not in models_to_render(without_embedder)
    assert LLM not in models_to_render(cache_off)
    templates_without_front = tmp_path / "templates"
    (templates_without_front / LLM).mkdir(parents=True)
    assert LLM not in models_to_render(with_embedder, templates_without_front)


def test_user_strings_are_escaped(artifacts, tmp_path):
    awkward = '/engines/"quoted" dir\\with\nnewline/${HOME}/é'
    settings = RepositorySettings(tokenizer_dir=artifacts["tokenizer_dir"], trtllm_engine_dir=awkward,
                                  engine=EngineSettings(kind="tensorrt_llm"), cache=CacheSettings(enabled=False))
    repository = render_repository(settings, tmp_path / "repository")

    assert "${" not in (repository / TENSORRT_LLM / "config.pbtxt").read_text()
    assert read_parameters(load_config(repository, TENSORRT_LLM))["gpt_model_path"] == awkward


def test_bad_settings_are_refused_before_anything_is_written(artifacts, tmp_path):
    settings = RepositorySettings(**artifacts, engine=EngineSettings(max_batch_size=0))
    with pytest.raises(SettingsError, match="engine.max_batch_size"):
        render_repository(settings, tmp_path / "repository")
    missing_onnx = RepositorySettings(tokenizer_dir=artifacts["tokenizer_dir"], onnx_dir=tmp_path / "nowhere")
    with pytest.raises(SettingsError, match="onnx_dir"):
        render_repository(missing_onnx, tmp_path / "repository")
    assert not (tmp_path / "repository").exists()


def test_rendering_again_replaces_the_previous_repository(artifacts, tmp_path):
    out = tmp_path / "repository"
    render_repository(RepositorySettings(**artifacts, cache=FIXED_FLOOR), out)
    render_repository(RepositorySettings(**artifacts, cache=FIXED_FLOOR, max_request_batch_size=8), out)

    assert load_config(out, ENSEMBLE).max_batch_size == 8
    assert load_config(out, ENGINE).max_batch_size == 8
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["build", "repository"]


def test_a_folder_that_is_not_a_repository_is_never_replaced(artifacts, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a model repository"):
        render_repository(RepositorySettings(**artifacts, cache=FIXED_FLOOR), out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_template_and_values_must_agree(artifacts, tmp_path):
    templates = tmp_path / "templates"
    for model in (PREPROCESSING, ENGINE, POSTPROCESSING, ENSEMBLE):
        (templates / model / "1").mkdir(parents=True)
        (templates / model / "config.pbtxt.template").write_text(
            (TEMPLATES_DIR / model / "config.pbtxt.template").read_text())
    engine_template = templates / ENGINE / "config.pbtxt.template"
    engine_template.write_text(engine_template.read_text() + 'parameters { key: "x" value { string_value: "${x}" } }\n')

    with pytest.raises(RepositoryRenderError, match=r"placeholders without a value: \['x'\]"):
        render_repository(RepositorySettings(**artifacts, cache=FIXED_FLOOR), tmp_path / "repository",
                          templates_dir=templates)
    assert not (tmp_path / "repository").exists()


def test_missing_adapter_fails_the_render(artifacts, tmp_path):
    templates = tmp_path / "templates"
    for model in (PREPROCESSING, ENGINE, POSTPROCESSING, ENSEMBLE):
        (templates / model).mkdir(parents=True)
        (templates / model / "config.pbtxt.template").write_text(
            (TEMPLATES_DIR / model / "config.pbtxt.template").read_text())
    with pytest.raises(RepositoryRenderError, match="model.py") as raised:
        render_repository(RepositorySettings(**artifacts, cache=FIXED_FLOOR), tmp_path / "repository",
                          templates_dir=templates)
    assert {finding.file for finding in raised.value.findings} == {
        f"{model}/1/model.py" for model in (PREPROCESSING, ENGINE, POSTPROCESSING)}
    assert not (tmp_path / "repository").exists()


def test_the_served_name_is_recorded_for_the_gateway(artifacts, tmp_path):
    from tritonllm.gateway.tokens import repository_served_name
    from tritonllm.paths import served_name

    repository = render_repository(RepositorySettings(**artifacts, cache=FIXED_FLOOR, served_model_name="gemma3-270m"),
                                   tmp_path / "repository")
    assert repository_served_name(repository) == "gemma3-270m" and not lint_repository(repository)
    config = repository / PREPROCESSING / "config.pbtxt"
    config.write_text(config.read_text() + "parameters { key: \"broken\"\n")
    with pytest.raises(ValueError, match="preprocessing/config.pbtxt.*does not parse"):
        repository_served_name(repository)
    gguf = tmp_path / "My-Model.Q8_0.gguf"
    gguf.write_bytes(b"")
    (tmp_path / "hf-folder").mkdir()
    assert [served_name(model) for model in (None, "gemma3-270m", gguf, tmp_path / "hf-folder")] == [
        "smollm2-135m-instruct", "gemma3-270m", "My-Model.Q8_0", "hf-folder"]

"""The content-cached build pipeline on a tiny random Llama (the real SmolLM2 build is `slow`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from support import build_in_shared_cache, save_tiny_model
from tritonllm.builders import pipeline
from tritonllm.builders.errors import BuildError
from tritonllm.builders.pipeline import build
from tritonllm.contract import CacheSettings, EngineSettings, SettingsError

NO_CACHE = CacheSettings(enabled=False)  # skips the sentence embedder export; the slow build covers it


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))  # before the cache moves: reuses the GGUF folder


@pytest.fixture(scope="module")
def cache_root(tiny_dir, tmp_path_factory):
    """A private build cache for this module."""
    with pytest.MonkeyPatch.context() as patch:
        root = tmp_path_factory.mktemp("cache")
        patch.setenv("TRITONLLM_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def first_build(tiny_dir, cache_root):
    return build(model=tiny_dir, precision="fp32", cache=NO_CACHE)


def leftovers(folder: Path) -> list[str]:
    return [path.name for path in folder.iterdir() if path.name.startswith(".")]


def test_build_lays_out_the_documented_folder(first_build, cache_root):
    out = first_build.out_dir
    assert out == cache_root / f"build-{first_build.key[:16]}" and not first_build.cached
    assert (first_build.hf_dir / "config.json").is_file() and (first_build.hf_dir / "tokenizer.json").is_file()
    assert first_build.onnx_dir == out / "onnx-fp32" and (first_build.onnx_dir / "model.onnx").is_file()
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["max_abs_logit_diff"] <= pipeline.FP32_TOLERANCE
    assert json.loads((out / "build.json").read_text())["key"] == first_build.key
    served = first_build.repository_dir / "engine" / "1" / "onnx" / "model.onnx.data"
    assert os.path.samefile(served, first_build.onnx_dir / "model.onnx.data")  # hard-linked, not copied
    assert {p.name for p in first_build.repository_dir.iterdir()} == {
        "ensemble", "preprocessing", "engine", "postprocessing"}  # no front model without the semantic cache
    assert leftovers(cache_root) == [] and leftovers(out) == []


def test_second_build_is_cached(first_build, tiny_dir):
    again = build(model=tiny_dir, precision="fp32", cache=NO_CACHE)
    assert again.cached and again.out_dir == first_build.out_dir and again.key == first_build.key


def test_a_setting_change_rerenders_on_the_cached_export(first_build, tiny_dir, cache_root):
    (decoder,) = cache_root.glob("decoder-fp32-*")
    exported_at = (decoder / "model.onnx").stat().st_mtime_ns
    other = build(model=tiny_dir, precision="fp32", cache=NO_CACHE, served_model_name="tiny",
                  engine=EngineSettings(max_batch_size=4))
    assert other.out_dir != first_build.out_dir and not other.cached
    assert list(cache_root.glob("decoder-fp32-*")) == [decoder]
    assert (decoder / "model.onnx").stat().st_mtime_ns == exported_at
    assert 'string_value: "4"' in (other.repository_dir / "engine" / "config.pbtxt").read_text()


def test_explicit_out_dir_is_rebuilt_in_place_when_the_key_changes(first_build, tiny_dir, tmp_path):
    out = tmp_path / "my-build"
    built = build(model=tiny_dir, out_dir=out, precision="fp32", cache=NO_CACHE)
    assert built.out_dir == out and (out / "repository" / "engine" / "config.pbtxt").is_file()
    rebuilt = build(model=tiny_dir, out_dir=out, precision="fp32", cache=NO_CACHE, served_model_name="renamed")
    assert rebuilt.key != built.key and not rebuilt.cached
    assert json.loads((out / "build.json").read_text())["key"] == rebuilt.key
    assert leftovers(tmp_path) == []


def test_a_folder_that_is_not_a_build_is_never_overwritten(tiny_dir, cache_root, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(BuildError, match="exists and is not a tritonllm build"):
        build(model=tiny_dir, out_dir=tmp_path, precision="fp32", cache=NO_CACHE)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_int8_build_is_gated_by_agreement_with_fp32(first_build, tiny_dir, cache_root):
    result = build(model=tiny_dir, precision="int8", cache=NO_CACHE)
    gate = json.loads((result.out_dir / "parity.json").read_text())
    assert gate["passed"] and gate["top1_agreement"] >= pipeline.MIN_TOP1_AGREEMENT
    assert gate["perplexity_increase"] <= pipeline.MAX_PERPLEXITY_INCREASE and gate["scored_tokens"] > 0
    assert gate["fp32_parity"]["passed"]
    assert len(list(cache_root.glob("decoder-fp32-*"))) == 1  # gated against the cached fp32 graph


def test_a_failed_gate_publishes_nothing(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONLLM_CACHE", str(tmp_path))
    monkeypatch.setattr(pipeline, "MIN_TOP1_AGREEMENT", 1.01)  # no model can reach it
    with pytest.raises(BuildError, match=r"int8 gate failed: top-1 agreement with fp32 .* \(required >= 1.01\)"):
        build(model=tiny_dir, precision="int8", cache=NO_CACHE)
    assert not list(tmp_path.glob("decoder-int8-*")) and not list(tmp_path.glob("build-*"))
    assert leftovers(tmp_path) == []


def test_bad_arguments_are_refused_before_any_work(tiny_dir, cache_root):
    with pytest.raises(BuildError, match="precision = 'fp16' is not supported; allowed: fp32, int8, int4"):
        build(model=tiny_dir, precision="fp16")
    with pytest.raises(BuildError, match="got engine kind 'onnxruntime', precision 'int8'"):
        build(model=tiny_dir, precision="fp32", engine=EngineSettings(precision="int8"))
    with pytest.raises(BuildError, match=r"unknown build settings \['max_batch'\]"):
        build(model=tiny_dir, precision="fp32", max_batch=3)
    with pytest.raises(SettingsError, match="engine.max_batch_size = 0"):
        build(model=tiny_dir, precision="fp32", engine=EngineSettings(max_batch_size=0))
    with pytest.raises(BuildError, match="precision = 'bf16' is not supported; allowed: fp32, int8, int4"):
        build(model=tiny_dir, precision="bf16", cache=NO_CACHE)


def test_progress_shows_one_line_per_step(tiny_dir, cache_root):
    from rich.console import Console

    console = Console(record=True, width=120, force_terminal=False)
    build(model=tiny_dir, precision="fp32", cache=NO_CACHE, served_model_name="progress", console=console)
    text = console.export_text()
    for step in ("model source", "ONNX graph + gate (fp32)", "Triton model repository"):
        assert step in text


@pytest.mark.model
def test_smollm2_build_passes_its_gate_and_serves_the_fixed_tokenizer(smollm2_build):
    from transformers import AutoTokenizer

    parity = json.loads((smollm2_build.out_dir / "parity.json").read_text())
    assert parity["passed"] and all(step["same_argmax"] for step in parity["steps"])
    tokenizer = AutoTokenizer.from_pretrained(smollm2_build.repository_dir / "preprocessing" / "1" / "tokenizer")
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert (smollm2_build.repository_dir / "llm" / "1" / "embedder").is_dir()  # the semantic cache's embedder


@pytest.mark.model
def test_smollm2_int8_build_agrees_with_fp32(smollm2_build):
    result = build_in_shared_cache(model=None, precision="int8")  # gated against smollm2_build's fp32 graph
    gate = json.loads((result.out_dir / "parity.json").read_text())
    assert gate["top1_agreement"] >= pipeline.MIN_TOP1_AGREEMENT

"""trtllm-build argument construction from the engine settings, and the explanation where TensorRT-LLM is absent."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tritonllm.builders.errors import BuildError
from tritonllm.contract import EngineSettings, SettingsError
from tritonllm.builders.trtllm import (NGC_IMAGE, TensorRTLLMUnavailable, attention_windows, build_engine,
                                       checkpoint_quantization, ngc_instructions, trtllm_build_args)


def _checkpoint(folder: Path, quant_algo: str | None, kv_cache_quant_algo: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architecture": "LlamaForCausalLM",
        "quantization": {"quant_algo": quant_algo, "kv_cache_quant_algo": kv_cache_quant_algo}}))
    return folder


def _options(args: list[str]) -> dict[str, str]:
    assert args[0] == "trtllm-build"
    assert len(args[1:]) % 2 == 0, "every option takes one value"
    return dict(zip(args[1::2], args[2::2]))


def test_build_args_follow_the_engine_settings(tmp_path):
    checkpoint = _checkpoint(tmp_path / "ckpt", "FP8", "FP8")
    settings = EngineSettings(kind="tensorrt_llm", max_batch_size=32, max_context_length=4096,
                              kv_cache_max_tokens=65536, prefill_chunk_tokens=512)
    options = _options(trtllm_build_args(checkpoint, tmp_path / "engine", settings,
                                         checkpoint_quantization(checkpoint)))
    assert options == {
        "--checkpoint_dir": str(checkpoint),
        "--output_dir": str(tmp_path / "engine"),
        "--max_batch_size": "32",
        "--max_input_len": "4095",
        "--max_seq_len": "4096",
        "--max_num_tokens": "576",  # 512-token prefill chunk + 32 decode tokens, rounded up to 64-token KV pages
        "--max_beam_width": "1",
        "--kv_cache_type": "paged",
        "--tokens_per_block": "64",
        "--use_paged_context_fmha": "enable",
        "--remove_input_padding": "enable",
        "--workers": "1",
        "--gemm_plugin": "fp8",
        "--use_fp8_context_fmha": "enable",
    }


@pytest.mark.parametrize("quant_algo, kv_cache_quant_algo, gemm_plugin, fp8_fmha", [
    ("FP8", None, "fp8", None),
    ("FP8", "FP8", "fp8", "enable"),
    ("W4A16_AWQ", "FP8", "auto", "enable"),
    ("W4A16_AWQ", None, "auto", None),
    (None, None, None, None),
])
def test_fp8_options_follow_the_checkpoint_quantization(tmp_path, quant_algo, kv_cache_quant_algo, gemm_plugin,
                                                        fp8_fmha):
    checkpoint = _checkpoint(tmp_path, quant_algo, kv_cache_quant_algo)
    options = _options(trtllm_build_args(checkpoint, tmp_path / "engine", EngineSettings(kind="tensorrt_llm"),
                                         checkpoint_quantization(checkpoint)))
    assert options.get("--gemm_plugin") == gemm_plugin
    assert options.get("--use_fp8_context_fmha") == fp8_fmha
    assert options["--max_num_tokens"] == "320"  # defaults: 256-token chunks + 16 sequences -> 5 pages of 64


def test_invalid_settings_are_refused_before_building(tmp_path):
    checkpoint = _checkpoint(tmp_path, "FP8", None)
    with pytest.raises(SettingsError, match="engine.max_batch_size"):
        trtllm_build_args(checkpoint, tmp_path / "engine", EngineSettings(kind="tensorrt_llm", max_batch_size=0),
                          checkpoint_quantization(checkpoint))


def test_absent_tensorrt_llm_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no trtllm-build anywhere
    checkpoint = _checkpoint(tmp_path / "out" / "trtllm_checkpoint", "FP8", "FP8")
    settings = EngineSettings(kind="tensorrt_llm")
    with pytest.raises(TensorRTLLMUnavailable) as error:
        build_engine(checkpoint, tmp_path / "out" / "engine", settings)
    message = str(error.value)
    assert isinstance(error.value, BuildError)  # the CLI reports BuildErrors as one message, no traceback
    assert message == ngc_instructions(checkpoint, settings)
    assert "TensorRT-LLM is not installed here" in message
    assert f"docker run --rm --gpus all -v {(tmp_path / 'out').resolve()}:/workspace/out {NGC_IMAGE}" in message
    assert ("trtllm-build --checkpoint_dir /workspace/out/trtllm_checkpoint --output_dir /workspace/out/engine "
            "--max_batch_size 16") in message
    assert "docker/Dockerfile.trtllm" in message
    assert "tensorrt_llm" not in sys.modules  # looked up, never imported


def test_a_folder_without_checkpoint_is_refused(tmp_path):
    with pytest.raises(BuildError, match="is not a TensorRT-LLM checkpoint"):
        build_engine(tmp_path, tmp_path / "engine", EngineSettings(kind="tensorrt_llm"))


def test_gemma3_sliding_windows_are_served_per_layer(tmp_path, monkeypatch):
    """trtllm-build bakes no window into a Gemma 3 engine: the instructions and the repository carry one per layer
    (the sliding layers' window, the whole sequence on every _sliding_window_pattern-th layer)."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    checkpoint = _checkpoint(tmp_path / "out" / "trtllm_checkpoint", "FP8", None)
    gemma3 = {"architecture": "Gemma3ForCausalLM", "num_hidden_layers": 7, "num_attention_heads": 4,
              "hidden_size": 640, "head_size": 256, "hidden_act": "gelu", "position_embedding_type": "rope_gpt_neox",
              "rotary_base": 1000000.0, "rotary_scaling": None, "max_position_embeddings": 32768,
              "query_pre_attn_scalar": 256, "final_logit_softcapping": None, "_sliding_window_pattern": 3,
              "rope_local_base_freq": 10000.0, "sliding_window": 512,
              "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None}}
    (checkpoint / "config.json").write_text(json.dumps(gemma3))
    settings = EngineSettings(kind="tensorrt_llm", max_context_length=4096)
    assert attention_windows(checkpoint, settings) == (512, 512, 4096, 512, 512, 4096, 512)
    assert 'max_attention_window_size = "512,512,4096,512,512,4096,512"' in ngc_instructions(checkpoint, settings)
    # A window longer than the context is the whole context.
    assert attention_windows(checkpoint, EngineSettings(kind="tensorrt_llm", max_context_length=256)) == (256,) * 7
    llama = _checkpoint(tmp_path / "llama", "FP8", None)
    assert attention_windows(llama, settings) == ()
    assert "max_attention_window_size" not in ngc_instructions(llama, settings)

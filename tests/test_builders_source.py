"""Model source: GGUF conversion (once, special tokens fixed), HF folder validation, content keys, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tritonllm.builders.errors import BuildError
from tritonllm.builders.source import CONVERSION_VERSION, content_key, prepare_hf_model
from tritonllm.paths import bundled_gguf, cache_dir


@pytest.fixture(scope="module")
def converted() -> Path:
    """The bundled SmolLM2 GGUF converted once into the shared cache ($TRITONLLM_CACHE or ~/.cache/tritonllm)."""
    return prepare_hf_model(None, cache_dir())


def test_gguf_conversion_fixes_special_tokens(converted):
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == GenerationConfig.from_pretrained(converted).eos_token_id
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "float32"
    assert converted.name == f"hf-{content_key(bundled_gguf())[:16]}-v{CONVERSION_VERSION}"
    assert tokenizer.chat_template  # the instruct model keeps its chat template
    # As the GGUF says: no BOS before a raw prompt; decode keeps the text's own spacing.
    assert tokenizer("Hello world")["input_ids"][0] != tokenizer.bos_token_id
    assert tokenizer.decode(tokenizer("a , b .")["input_ids"]) == "a , b ."


def test_gguf_is_converted_once(converted):
    before = (converted / "model.safetensors").stat().st_mtime_ns
    assert prepare_hf_model(bundled_gguf(), cache_dir()) == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == before
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(f".{converted.name}.")]  # no leftovers


def test_hf_folder_is_used_in_place(converted):
    assert prepare_hf_model(converted, Path("/nonexistent-cache")) == converted


def test_content_key_follows_names_and_bytes(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("one")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.txt").write_text("two")
    key = content_key(folder)
    assert content_key(folder) == key and len(key) == 64
    (folder / "sub" / "b.txt").write_text("three")
    changed = content_key(folder)
    assert changed != key
    (folder / "sub" / "b.txt").rename(folder / "sub" / "c.txt")
    assert content_key(folder) != changed
    (tmp_path / "file").write_text("one")
    assert content_key(tmp_path / "file") == content_key(folder / "a.txt")
    with pytest.raises(BuildError, match="does not exist"):
        content_key(tmp_path / "missing")


def test_missing_and_unsupported_paths_are_refused(tmp_path):
    with pytest.raises(BuildError, match="'.*nowhere' does not exist; give a Hugging Face model folder, a .gguf "
                                         "file or a bundled model: smollm2-135m-instruct, gemma3-270m"):
        prepare_hf_model(tmp_path / "nowhere", tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(BuildError, match="weights.bin' is not supported: give a Hugging Face model folder"):
        prepare_hf_model(tmp_path / "weights.bin", tmp_path)


def test_unreadable_gguf_is_refused_without_leftovers(tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    cache_root = tmp_path / "cache"
    with pytest.raises(BuildError, match="cannot load .*broken.gguf with transformers"):
        prepare_hf_model(tmp_path / "broken.gguf", cache_root)
    assert list(cache_root.iterdir()) == []


def _copy_without_weights(converted: Path, target: Path) -> Path:
    shutil.copytree(converted, target, ignore=shutil.ignore_patterns("*.safetensors"))
    return target


def test_hf_folder_without_tokenizer_is_refused(converted, tmp_path):
    folder = _copy_without_weights(converted, tmp_path / "model")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(BuildError, match="has no tokenizer.json"):
        prepare_hf_model(folder, tmp_path)


def test_unsupported_architecture_is_refused(converted, tmp_path):
    folder = _copy_without_weights(converted, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(BuildError, match="model_type 'bert' is not supported; allowed: llama, qwen2, mistral, gemma3_text"):
        prepare_hf_model(folder, tmp_path)


def test_special_tokens_that_disagree_with_the_generation_config_are_refused(converted, tmp_path):
    folder = _copy_without_weights(converted, tmp_path / "model")
    special = json.loads((folder / "special_tokens_map.json").read_text())
    (folder / "special_tokens_map.json").write_text(json.dumps({**special, "eos_token": "<|im_start|>"}))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "eos_token": "<|im_start|>"}))
    with pytest.raises(BuildError, match=r"special tokens disagree: eos: tokenizer has '<\|im_start\|>' \(id 1\), "
                                         r"generation config says id 2"):
        prepare_hf_model(folder, tmp_path)


def sentencepiece_gguf(path: Path, pieces: dict[str, tuple[float, int]]) -> dict:
    """The fields of a GGUF holding only a SentencePiece vocabulary: piece -> (score, GGUF token type)."""
    from gguf import GGUFReader, GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(list(pieces))
    writer.add_token_scores([score for score, _ in pieces.values()])
    writer.add_token_types([kind for _, kind in pieces.values()])
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFReader(str(path)).fields


@pytest.mark.parametrize(("ab_score", "expected"), [(-1.0, ["ab", "c"]), (-3.0, ["a", "bc"])])
def test_sentencepiece_vocabularies_join_the_highest_scoring_pair_first(tmp_path, ab_score, expected):
    """SentencePiece BPE as llama.cpp runs it on a GGUF vocabulary: the adjacent pair whose joined piece scores
    highest joins first; characters outside the vocabulary fall back to byte pieces; user-defined pieces (here a run
    of newlines) are matched whole before the model, control pieces are special."""
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import Unigram

    from tritonllm.builders.source import _sentencepiece_bpe

    pieces = {"<unk>": (0.0, 2), "<s>": (0.0, 3), "a": (-5.0, 1), "b": (-5.0, 1), "c": (-5.0, 1),
              "ab": (ab_score, 1), "bc": (-2.0, 1), "▁": (-4.0, 1), "▁a": (-1.5, 1), "\n\n": (0.0, 4),
              **{f"<0x{byte:02X}>": (0.0, 6) for byte in range(256)}}
    converted = Tokenizer(Unigram())  # carries what transformers' conversion decided around the model
    converted.normalizer = normalizers.Replace(" ", "▁")
    converted.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer = _sentencepiece_bpe(sentencepiece_gguf(tmp_path / "vocab.gguf", pieces), converted)
    assert tokenizer.encode("abc", add_special_tokens=False).tokens == expected
    encoding = tokenizer.encode("abc a\n\né<s>", add_special_tokens=False)
    assert encoding.tokens == [*expected, "▁a", "\n\n", "<0xC3>", "<0xA9>", "<s>"]
    assert tokenizer.decode(encoding.ids, skip_special_tokens=True) == "abc a\n\né"

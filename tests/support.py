"""Plain helpers shared by test modules (fixtures live in conftest.py): tiny models, artifacts, tokenizer texts.

Import them with `from support import ...`; test modules never import each other.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import pytest
import requests
from onnx import TensorProto, helper
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from tritonllm.contract import CacheSettings
from tritonllm.paths import cache_dir

# The build cache the session started with: real-model builds go there even inside a module that patched in a
# private cache, so they are built once and persist across runs.
SHARED_CACHE = cache_dir()


def build_in_shared_cache(**build_arguments):
    """`builders.pipeline.build(**build_arguments)` in SHARED_CACHE."""
    from tritonllm.builders.pipeline import build

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITONLLM_CACHE", str(SHARED_CACHE))
        return build(**build_arguments)


TINY_VOCAB = 49152  # vocabulary of export_tiny_llama's model

# Accents, CJK, Korean, emoji (multi-codepoint ones too), leading/trailing/multiple spaces, newlines, tabs, code.
TEXTS = [
    "Hello world",
    " leading space and  double  spaces ",
    "The café served crème brûlée to a naïve visitor in Zürich.",
    "中文分词测试。日本語のテキストも少し。",
    "한국어 문장입니다.",
    "Emoji: 👍🏽 🇫🇷 👨‍👩‍👧 🤖✨",
    "Ελληνικά και русский текст",
    "def f(x):\n\treturn x ** 2  # square\n",
    "\n\nnew lines\r\nand ｆｕｌｌｗｉｄｔｈ",
    "mixed: a中b👍c é",
]


def sentencepiece_style_tokenizer(decoder: decoders.Decoder) -> Tokenizer:
    """A small Llama-2-like BPE: `▁` for spaces, byte fallback to `<0xNN>` tokens for characters it never saw (CJK,
    emoji), special tokens <unk> <s> </s>."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator([text for text in TEXTS if text.isascii()] * 5, trainer)
    config = json.loads(tokenizer.to_str())
    vocab = config["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tokenizer = Tokenizer.from_str(json.dumps(config))
    tokenizer.decoder = decoder
    return tokenizer


SENTENCEPIECE_DECODERS = {
    # Llama 2 / Mistral tokenizer.json: one leading space of the whole text is stripped.
    "llama": decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                decoders.Strip(" ", 1, 0)]),
    # Metaspace decoder: the first token loses its `▁` (every one of them) unless the scheme is "never".
    "metaspace-first": decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace("▁", "first")]),
    "metaspace-never": decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace("▁", "never")]),
    # Gemma: no stripping at all.
    "no-strip": decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]),
}


def random_id_sequences(vocab_size: int, count: int, seed: int, max_length: int = 12) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(rng.randrange(1, max_length))] for _ in range(count)]


# make_artifacts' embedder is a bare ONNX graph that cannot embed text, so no cosine floor can be derived with it:
# repositories rendered from those artifacts fix the floor.
FIXED_FLOOR = CacheSettings(similarity_threshold=0.5)


def make_artifacts(root: Path) -> dict[str, Path]:
    """A tokenizer folder (byte-level BPE + generation config + a weights file that must not be copied), a folder
    holding a valid ONNX graph, and an embedder folder."""
    tokenizer_dir = root / "hf"
    tokenizer_dir.mkdir(parents=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(["Hello world, this is a tokenizer test."] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(tokenizer_dir / "tokenizer.json"))
    (tokenizer_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "pad_token_id": 2}))
    (tokenizer_dir / "model.safetensors").write_bytes(b"weights stay out of the tokenizer folders")

    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "tiny",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "tokens"])],
                              [helper.make_tensor_value_info("logits", TensorProto.INT64, [1, "tokens"])])
    onnx_dir = root / "onnx-fp32"
    onnx_dir.mkdir()
    onnx.save(helper.make_model(graph), str(onnx_dir / "model.onnx"))

    embedder_dir = root / "embedder"
    embedder_dir.mkdir()
    onnx.save(helper.make_model(graph), str(embedder_dir / "model.onnx"))
    return {"tokenizer_dir": tokenizer_dir, "onnx_dir": onnx_dir, "embedder_dir": embedder_dir}


def export_tiny_llama(root: Path) -> Path:
    """A tiny random Llama (vocab TINY_VOCAB) built into the engine's fp32 ONNX graph; returns the ONNX folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tritonllm.builders.onnx_graph import write_decoder

    torch.manual_seed(0)
    # initializer_range 0.1 spreads the logits (top-2 gap ~0.13) so fp32 noise from batching cannot flip an argmax.
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=512,
                         initializer_range=0.1)
    LlamaForCausalLM(config).save_pretrained(root / "hf")
    (root / "onnx").mkdir()
    write_decoder(root / "hf", root / "onnx", "fp32")
    return root / "onnx"


def save_tiny_model(folder: Path, model_type: str = "llama", **config_values) -> Path:
    """A tiny random decoder (hidden 64, 2 layers, 4 heads / 2 KV heads) saved with SmolLM2's converted tokenizer;
    `config_values` add to or replace the config's values.

    Weights are drawn wider than the default (std 0.1) so logits vary enough for parity to mean something.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tritonllm.builders.source import prepare_hf_model
    from tritonllm.paths import cache_dir

    tokenizer = AutoTokenizer.from_pretrained(prepare_hf_model(None, cache_dir()))
    config = AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048, rope_theta=100000.0,
        initializer_range=0.1, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **config_values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# Gemma 3's block on a tiny random model: a window of 4 tokens (shorter than the prompts the tests run, so the sliding
# layer's mask and its own RoPE base matter at every step), one sliding then one full layer, final soft-capping on.
TINY_GEMMA3 = dict(head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                   query_pre_attn_scalar=32, rope_local_base_freq=10.0, hidden_activation="gelu_pytorch_tanh",
                   final_logit_softcapping=3.0)


def save_tiny_gemma3(folder: Path, **config_values) -> Path:
    """`save_tiny_model` of TINY_GEMMA3 (`config_values` add to or replace it) with its RMSNorm weights drawn away
    from zero, so that the (1 + weight) norms are exercised. They are drawn where 1 + weight is a bfloat16 number:
    TensorRT-LLM checkpoints store that sum in bf16, so a rebuild from one can then be compared with the model
    exactly."""
    import torch
    from transformers import AutoModelForCausalLM

    save_tiny_model(folder, "gemma3_text", **{**TINY_GEMMA3, **config_values})
    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_((1.0 + 0.3 * torch.randn_like(parameter)).bfloat16().float() - 1.0)
    model.save_pretrained(folder)
    return folder


@dataclass
class Collector:
    """Outputs of one engine request, with a flag set on its final output."""

    outputs: list = field(default_factory=list)
    finished: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False

    def emit(self, output) -> None:
        self.outputs.append(output)
        if output.final:
            self.finished.set()

    def wait(self):
        assert self.finished.wait(60), "no final output within 60 s"
        return self.outputs[-1]

    @property
    def generated(self) -> list[int]:
        """Ids of the sequence as a client sees them: non-streaming final ids, or the new ids of every piece."""
        return [token for output in self.outputs for token in output.token_ids[output.context_length:]]


def run_request(engine, request) -> Collector:
    """Submit `request` to an Engine and wait for its final output."""
    collector = Collector()
    engine.submit(request, collector.emit, lambda: collector.cancelled)
    collector.wait()
    return collector


def engine_metric(server, name: str, **labels: str) -> float:
    """The metric `name` (with these label values) on a running TritonServer's /metrics; 0 when it is not there
    yet (the engine's metrics are flushed periodically)."""
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    for line in requests.get(server.endpoints.metrics_url, timeout=10).text.splitlines():
        if line.startswith(name) and all(label in line for label in wanted):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class RedisServer:
    """A real redis-server (Debian's package; `make setup` installs it) on a free 127.0.0.1 port, without
    persistence; use as a context manager (killed on exit)."""

    def __init__(self, port: int | None = None, password: str | None = None) -> None:
        from tritonllm.server import free_port

        self.port = port or free_port()
        self.password = password
        self.url = f"redis://{f':{password}@' if password else ''}127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "RedisServer":
        import redis

        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed: `make setup` installs Debian's redis-server package"
        self.process = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                                         "--appendonly", "no", "--daemonize", "no",
                                         *(["--requirepass", self.password] if self.password else [])],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, f"redis-server exited with code {self.process.returncode}"
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not answer PING within 30 s"
                time.sleep(0.05)
        client.close()
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.kill()
        self.process.wait()

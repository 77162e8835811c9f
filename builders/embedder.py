"""Export the bundled all-MiniLM-L6-v2 sentence embedder to ONNX for the semantic cache, and check it.

The export holds the transformer only (token vectors); pooling and normalisation run in
`tritonllm.python_backends.embedding`, which is exactly what the cache runs. The check embeds 50 varied sentences
(`data/embedder_check_sentences.txt`: short, long past truncation, non-ASCII, code) with that runtime and with
sentence-transformers on the original weights, and fails the build unless every pair has cosine >= `MIN_COSINE`.

Output folder: `model.onnx`, `tokenizer.json` (truncation to the model's `max_seq_length`, pad to the longest),
`embedder.json` (dimension, sequence limit, source, SHA-256 of the graph, check result). The caller content-caches
the folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from tritonllm.paths import bundled_embedder
from tritonllm.python_backends.embedding import METADATA_FILE, MODEL_FILE, TOKENIZER_FILE, Embedder
from .errors import BuildError
from .files import atomic_dir

MIN_COSINE = 0.9999
OPSET = 18
CHECK_SENTENCES_FILE = Path(__file__).resolve().parent / "data" / "embedder_check_sentences.txt"


def export_embedder(out_dir: Path, source_dir: Path | None = None, replace: bool = True) -> Path:
    """Write the checked ONNX embedder of `source_dir` (default: the bundled MiniLM) to `out_dir`; returns it.

    `out_dir` is assembled under a temporary name and renamed at the end, so it never exists half-written; an
    existing `out_dir` is replaced, or kept with `replace=False` (see `files.atomic_dir`).
    """
    source_dir = Path(source_dir) if source_dir is not None else bundled_embedder()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, replace=replace) as work_dir:
        max_seq_length, dimension = _export_onnx(source_dir, work_dir)
        _write_tokenizer(source_dir, work_dir, max_seq_length)
        metadata = {"source": str(source_dir), "dimension": dimension, "max_seq_length": max_seq_length,
                    "pooling": "mean", "normalized": True,
                    "onnx_sha256": hashlib.sha256((work_dir / MODEL_FILE).read_bytes()).hexdigest()}
        (work_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        metadata["check"] = check_against_sentence_transformers(source_dir, work_dir)
        (work_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return out_dir


def check_against_sentence_transformers(source_dir: Path, onnx_dir: Path) -> dict[str, float | int]:
    """Cosine between the ONNX runtime's and sentence-transformers' vectors of the check sentences; raises below
    `MIN_COSINE`."""
    from sentence_transformers import SentenceTransformer

    sentences = CHECK_SENTENCES_FILE.read_text(encoding="utf-8").split("\n")[:-1]  # keep each line's own spaces
    reference = SentenceTransformer(str(source_dir), device="cpu").encode(sentences, convert_to_numpy=True,
                                                                          normalize_embeddings=True)
    ours = Embedder(onnx_dir, intra_op_threads=0).embed(sentences)
    cosines = (reference * ours).sum(axis=1)
    worst = int(np.argmin(cosines))
    result = {"sentences": len(sentences), "min_cosine": float(cosines[worst]), "min_cosine_required": MIN_COSINE}
    if cosines[worst] < MIN_COSINE:
        raise BuildError(f"embedder check failed: cosine {cosines[worst]:.6f} < {MIN_COSINE} between the ONNX "
                         f"embedder and sentence-transformers on sentence {worst}: {sentences[worst][:80]!r}")
    return result


def _export_onnx(source_dir: Path, out_dir: Path) -> tuple[int, int]:
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(source_dir, attn_implementation="eager").eval()
    max_seq_length = json.loads((source_dir / "sentence_bert_config.json").read_text())["max_seq_length"]

    class TokenVectors(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    # Different example sizes (> 1) so the exporter cannot specialise a dim to a constant.
    input_ids = torch.randint(1000, 2000, (2, 7), dtype=torch.int64)
    attention_mask = torch.ones(2, 7, dtype=torch.int64)
    batch = torch.export.Dim("batch", max=4096)
    sequence = torch.export.Dim("sequence", max=max_seq_length)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                TokenVectors().eval(), (input_ids, attention_mask), dynamo=True,
                dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}},
                input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                opset_version=OPSET, external_data=False, optimize=True, verbose=False,
            )
            program.save(out_dir / MODEL_FILE, external_data=False)
    except Exception as error:  # the exporter raises many types; the build wants one clear failure
        raise BuildError(f"ONNX export of the embedder {source_dir} failed: {type(error).__name__}: {error}") from error
    return int(max_seq_length), int(model.config.hidden_size)


def _write_tokenizer(source_dir: Path, out_dir: Path, max_seq_length: int) -> None:
    from tokenizers import Tokenizer

    # The shipped tokenizer.json truncates and pads to a fixed 128; sentence-transformers truncates to
    # max_seq_length and pads a batch to its longest text.
    tokenizer = Tokenizer.from_file(str(source_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_seq_length)
    pad_token = "[PAD]"
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id(pad_token), pad_token=pad_token)
    tokenizer.save(str(out_dir / TOKENIZER_FILE))

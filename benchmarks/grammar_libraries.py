"""Which grammar library for structured output: llguidance (what the engine uses) against xgrammar and outlines-core,
on this CPU, with SmolLM2's tokenizer and the five schemas of benchmarks/structured_output.py.

For each library and schema: whether the schema compiles, the compile time, and the time to compute one next-token
mask (median over the tokens of a valid document, which is fed token by token; the document must be accepted).
llguidance is driven through the engine's own GrammarCompiler (python_backends/guided.py). The other two are not
project dependencies; install them beside the venv to compare:

  pip install --no-deps --target /tmp/glibs outlines-core==0.2.14 xgrammar==0.2.9 apache-tvm-ffi
  PYTHONPATH=/tmp/glibs python benchmarks/grammar_libraries.py [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from structured_output import SCHEMAS

from tritonllm.builders.source import prepare_hf_model
from tritonllm.paths import cache_dir
from tritonllm.python_backends.guided import GrammarCompiler, GuideSpec
from tritonllm.python_backends.token_bytes import TokenBytes

DOCUMENTS = {  # one valid instance of each schema, in the json.dumps layout the engine uses
    "flat": {"name": "Ada", "city": "Oslo", "active": True},
    "nested": {"title": "Dune", "author": {"name": "Frank Herbert", "born": 1920}},
    "arrays": {"items": ["tea", "milk", "honey"]},
    "enums": {"sentiment": "positive", "confidence": "high"},
    "bounded_numbers": {"rating": 4, "price": 19.5},
}


def timed(work) -> tuple[object, float]:
    started = time.perf_counter()
    result = work()
    return result, time.perf_counter() - started


def llguidance_run(tokenizer_dir: Path, vocab: int, schema: dict, tokens: list[int]) -> dict:
    import llguidance.numpy as llguidance_numpy

    compiler = GrammarCompiler(tokenizer_dir, vocab)
    guide, compile_s = timed(lambda: compiler.compile(GuideSpec("guided_json", json.dumps(schema))))
    bitmask = llguidance_numpy.allocate_token_bitmask(1, vocab)
    masks = []
    for token in tokens:
        masks.append(timed(lambda: llguidance_numpy.fill_next_token_bitmask(guide.matcher, bitmask, 0))[1])
        if not guide.advance(token):
            return {"compiled": True, "compile_s": compile_s, "accepted": False}
    return {"compiled": True, "compile_s": compile_s, "accepted": True, "mask_ms": 1e3 * statistics.median(masks)}


def xgrammar_run(tokenizer_dir: Path, vocab: int, schema: dict, tokens: list[int]) -> dict:
    import xgrammar
    from transformers import AutoTokenizer

    info = xgrammar.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(tokenizer_dir), vocab_size=vocab)
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    compiled, compile_s = timed(lambda: compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                                      separators=(", ", ": ")))
    matcher = xgrammar.GrammarMatcher(compiled)
    bitmask = xgrammar.allocate_token_bitmask(1, vocab)
    masks = []
    for token in tokens:
        masks.append(timed(lambda: matcher.fill_next_token_bitmask(bitmask))[1])
        if not matcher.accept_token(token):
            return {"compiled": True, "compile_s": compile_s, "accepted": False}
    return {"compiled": True, "compile_s": compile_s, "accepted": True, "mask_ms": 1e3 * statistics.median(masks)}


def outlines_run(tokenizer_dir: Path, vocab: int, schema: dict, tokens: list[int], eos_id: int) -> dict:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    table = TokenBytes.from_tokenizer_dir(tokenizer_dir)
    by_bytes: dict[bytes, list[int]] = {}
    for token in range(vocab):
        piece = table.bytes_of([token], opens_text=False)
        if piece and token != eos_id:
            by_bytes.setdefault(piece, []).append(token)
    vocabulary = Vocabulary(eos_id, by_bytes)

    def build():
        return Guide(Index(build_regex_from_schema(json.dumps(schema), whitespace_pattern=r" ?"), vocabulary))

    guide, compile_s = timed(build)
    masks = []
    for token in tokens:
        allowed, mask_s = timed(guide.get_tokens)
        masks.append(mask_s)
        if token not in allowed:
            return {"compiled": True, "compile_s": compile_s, "accepted": False}
        guide.advance(token)
    return {"compiled": True, "compile_s": compile_s, "accepted": True, "mask_ms": 1e3 * statistics.median(masks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, default=None, help="HF folder; default: the bundled SmolLM2")
    args = parser.parse_args()
    from tokenizers import Tokenizer

    tokenizer_dir = args.tokenizer or prepare_hf_model(None, cache_dir())
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size()
    eos_id = tokenizer.token_to_id("<|im_end|>")
    runs = {"llguidance": lambda schema, tokens: llguidance_run(tokenizer_dir, vocab, schema, tokens),
            "xgrammar": lambda schema, tokens: xgrammar_run(tokenizer_dir, vocab, schema, tokens),
            "outlines-core": lambda schema, tokens: outlines_run(tokenizer_dir, vocab, schema, tokens, eos_id)}
    results = []
    for name, schema in SCHEMAS.items():
        tokens = tokenizer.encode(json.dumps(DOCUMENTS[name])).ids
        for library, run in runs.items():
            try:
                row = run(schema, tokens)
            except Exception as error:  # a library that cannot take this schema is a result, not a crash
                row = {"compiled": False, "error": f"{type(error).__name__}: {error}"[:200]}
            results.append({"schema": name, "library": library, "tokens": len(tokens), **row})
            print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()

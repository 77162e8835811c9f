"""Accuracy of the FP8 TensorRT-LLM path on SmolLM2-135M-Instruct, against the float32 model, on the held-out prompts
of the accuracy gate (builders/data/heldout_prompts.jsonl): greedy top-1 agreement (teacher-forced) and perplexity.

Rows: the engine's bf16 without quantization (the floor any TensorRT-LLM build starts from), FP8 weights+activations,
the same with an FP8 KV cache, Model Optimizer's own simulated quantization of each (its fake quantization rounds
weights as x * (448/amax), the export as x / (amax/448); on SmolLM2, dequantized from Q4_1, ~1% of the weights of
some layers sit exactly on an FP8 tie and land on the other neighbour, so the rows differ a little: the gate measures
the exported checkpoint, which is what the engine runs), a deliberately damaged checkpoint (weight scales x100) that
the gate must reject, and for comparison the ONNX Runtime engine's fp32 and int8 exports on the same prompts.

  python benchmarks/fp8_report.py [--model HF_DIR] [--calib-size 128] [--variants bf16,fp8,...]
                                  [--out bench-results/fp8_report.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tritonllm.builders.fp8 import (DEFAULT_CALIBRATION_FILE, HELDOUT_FILE, calibrate_fp8, load_prompts,
                                    tokenize_prompts)
from tritonllm.builders.fp8_verify import CheckpointModel, GateThresholds, run_gate, score_sequences


VARIANTS = ("bf16", "fp8", "fp8-kv", "damaged", "onnx")


def _onnx_logits(onnx_dir: Path):
    """[1, T] ids -> [1, T, vocab] logits through the serving executor, one position per step (teacher-forced)."""
    from tritonllm.python_backends.onnx_runner import OnnxDecoder

    def logits(ids: torch.Tensor) -> torch.Tensor:
        tokens = ids[0].tolist()
        executor = OnnxDecoder(onnx_dir, slots=1, max_length=len(tokens))
        rows = [executor.prefill(0, [tokens[:1]])[0]]
        rows += [executor.decode([token])[0] for token in tokens[1:]]
        return torch.from_numpy(np.stack(rows))[None]

    return logits


def _export(model: torch.nn.Module, folder: Path) -> Path:
    from tritonllm.builders.trtllm_export import export_trtllm_checkpoint

    export_trtllm_checkpoint(model, folder)
    return folder


def _row(name: str, report=None, scores=None, reference=None) -> dict:
    if report is not None:
        return {"variant": name, "top1_agreement": report.top1_agreement, "perplexity": report.fp8_perplexity,
                "perplexity_increase": report.perplexity_increase, "gate": "pass" if report.passed else "REJECT",
                "seconds": round(report.seconds, 1)}
    agreement = torch.cat([a == b for a, b in zip(scores.top1, reference.top1)]).float().mean().item()
    return {"variant": name, "top1_agreement": agreement, "perplexity": scores.perplexity(),
            "perplexity_increase": scores.perplexity() / reference.perplexity() - 1, "gate": "", "seconds": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="HF folder; default: the bundled SmolLM2 (converted once)")
    parser.add_argument("--calib-size", type=int, default=128)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=Path("bench-results/fp8_report.json"))
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or set(variants) - set(VARIANTS) or ("damaged" in variants and "fp8-kv" not in variants):
        parser.error(f"--variants {args.variants!r}: allowed {', '.join(VARIANTS)} (damaged needs fp8-kv)")
    if args.model is None:
        from tritonllm.builders.source import prepare_hf_model
        from tritonllm.paths import cache_dir

        args.model = prepare_hf_model(None, cache_dir())
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    heldout = tokenize_prompts(tokenizer, load_prompts(HELDOUT_FILE))
    calibration = tokenize_prompts(tokenizer, load_prompts(DEFAULT_CALIBRATION_FILE, args.calib_size))
    reference_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    reference = score_sequences(lambda ids: reference_model(ids).logits, heldout)
    del reference_model
    thresholds = GateThresholds()
    rows = [{"variant": "float32 (reference)", "top1_agreement": 1.0, "perplexity": reference.perplexity(),
             "perplexity_increase": 0.0, "gate": "", "seconds": None}]

    def load_bf16() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if "bf16" in variants:
            bf16_dir = _export(load_bf16(), scratch / "bf16")
            rows.append(_row("bf16 rebuild, no quantization", run_gate(CheckpointModel(bf16_dir), heldout, reference,
                                                                       thresholds)))
        for kv_cache_fp8 in [kv for kv, name in ((False, "fp8"), (True, "fp8-kv")) if name in variants]:
            label = "FP8 weights+activations" + (" + FP8 KV cache" if kv_cache_fp8 else "")
            model = load_bf16()
            calibrate_fp8(model, calibration, kv_cache_fp8)
            checkpoint = _export(model, scratch / f"fp8-kv{int(kv_cache_fp8)}")
            with torch.no_grad():  # after the export, so fused layers share their scales as in the checkpoint
                simulated = score_sequences(lambda ids: model(ids).logits, heldout)
            rows.append(_row(f"{label}: Model Optimizer simulated (bf16)", scores=simulated, reference=reference))
            rows.append(_row(f"{label}: FP8 GEMM rebuild (gate)", run_gate(CheckpointModel(checkpoint), heldout,
                                                                          reference, thresholds)))
            del model
        if "damaged" in variants:
            damaged = shutil.copytree(scratch / "fp8-kv1", scratch / "damaged")
            tensors = load_file(damaged / "rank0.safetensors")
            for name in [n for n in tensors if n.endswith("weights_scaling_factor")]:
                tensors[name] = tensors[name] * 100
            save_file(tensors, damaged / "rank0.safetensors")
            rows.append(_row("FP8 + FP8 KV, weight scales x100 (damaged)", run_gate(CheckpointModel(damaged), heldout,
                                                                                   reference, thresholds)))
        if "onnx" in variants:
            from tritonllm.builders.onnx_graph import write_decoder

            folders = {}
            for precision in ("fp32", "int8"):
                folders[precision] = scratch / f"onnx-{precision}"
                folders[precision].mkdir()
                write_decoder(args.model, folders[precision], precision)
            for name, folder in (("ONNX Runtime engine, fp32 graph", folders["fp32"]),
                                 ("ONNX Runtime engine, int8 graph", folders["int8"])):
                rows.append(_row(name, scores=score_sequences(_onnx_logits(folder), heldout), reference=reference))

    title = (f"SmolLM2-135M-Instruct vs float32, {len(heldout)} held-out prompts / {reference.tokens} tokens, "
             f"calibration {len(calibration)} prompts; gate: top-1 >= {thresholds.min_top1_agreement:.0%}, "
             f"perplexity <= {thresholds.max_perplexity_increase:+.0%}")
    lines = [title, "", "| variant | greedy top-1 agreement | perplexity | vs float32 | gate |",
             "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['top1_agreement']:.2%} | {row['perplexity']:.3f} | "
                     f"{row['perplexity_increase']:+.2%} | {row['gate']} |")
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"title": title, "model": str(args.model), "rows": rows,
                                    "seconds": round(time.perf_counter() - started)}, indent=2) + "\n")
    print(f"\nwrote {args.out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()

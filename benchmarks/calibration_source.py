"""Does calibrating on traffic-like prompts beat the shipped generic prompts? Both 4-bit AWQ paths, each calibrated
once on builders/data/calibration_prompts.jsonl (generic, what a build uses by default) and once on
benchmarks/data/traffic_calibration.jsonl (traffic-like: what `capture_dir` would collect; `make_traffic_prompts.py`),
then scored against float32 on held-out prompts never calibrated on: benchmarks/data/traffic_heldout.jsonl (same
distribution as the traffic calibration) and the gate's builders/data/heldout_prompts.jsonl (generic).

- ONNX engine `--precision int4` (builders/awq.py scales, MatMulNBits 4-bit, lm_head 8-bit): write_decoder with the
  calibration file, scored by builders.parity.agreement (the int4 gate) through the serving executor.
- TensorRT-LLM `--quant int4_awq` (`trtllm`: Model Optimizer INT4_AWQ_CFG, W4A16 checkpoint) and FP8 (`trtllm-fp8`:
  per-tensor weight and activation scales, where calibration sets the activation ranges): calibrate_fp8 + export,
  scored by the gate's rebuild of the exported checkpoint (fp8_verify.run_gate).

  python benchmarks/calibration_source.py [--paths onnx,trtllm,trtllm-fp8] [--calib-size 128] [--work DIR]
                                          [--out bench-results/calibration_source.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from tritonllm.builders.fp8 import (DEFAULT_CALIBRATION_FILE, HELDOUT_FILE, calibrate_fp8, export_checkpoints,
                                    load_prompts, tokenize_prompts, torch_threads_for_load)
from tritonllm.builders.fp8_verify import (PER_TENSOR, W4A16_AWQ, CheckpointModel, GateThresholds, run_gate,
                                           score_sequences)
from tritonllm.builders.onnx_graph import write_decoder
from tritonllm.builders.parity import agreement
from tritonllm.builders.source import prepare_hf_model
from tritonllm.paths import cache_dir
from tritonllm.python_backends.onnx_runner import ONNX_FILE

DATA = Path(__file__).resolve().parent / "data"
CALIBRATIONS = {"generic": DEFAULT_CALIBRATION_FILE, "traffic": DATA / "traffic_calibration.jsonl"}
HELDOUTS = {"traffic held-out": DATA / "traffic_heldout.jsonl", "generic held-out": HELDOUT_FILE}


def onnx_rows(hf_dir: Path, work: Path) -> list[dict]:
    fp32 = work / "onnx-fp32"
    if not (fp32 / ONNX_FILE).is_file():
        fp32.mkdir(parents=True, exist_ok=True)
        write_decoder(hf_dir, fp32, "fp32")
    rows = []
    for calibration, calib_file in CALIBRATIONS.items():
        folder = work / f"onnx-int4-{calibration}"
        if not (folder / ONNX_FILE).is_file():
            folder.mkdir(parents=True, exist_ok=True)
            write_decoder(hf_dir, folder, "int4", calib_file)
        for heldout, heldout_file in HELDOUTS.items():
            scored = agreement(fp32, folder, hf_dir, texts=[text for _, text in load_prompts(heldout_file)])
            rows.append({"path": "onnx int4 (AWQ)", "calibration": calibration, "heldout": heldout,
                         "top1_agreement": scored.top1_agreement, "perplexity_increase": scored.perplexity_increase,
                         "tokens": scored.scored_tokens})
    return rows


# `--paths` value -> the TensorRT-LLM quantization it calibrates (Model Optimizer's, exported and rebuilt by the gate).
TRTLLM_PATHS = {"trtllm": (W4A16_AWQ, "trtllm int4_awq (W4A16)"),
                "trtllm-fp8": (PER_TENSOR, "trtllm fp8 per-tensor (weights + activations)")}


def trtllm_rows(hf_dir: Path, work: Path, calib_size: int, path: str) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    heldouts = {name: tokenize_prompts(tokenizer, load_prompts(file)) for name, file in HELDOUTS.items()}
    reference_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    references = {name: score_sequences(lambda ids: reference_model(ids).logits, ids) for name, ids in heldouts.items()}
    del reference_model
    quant_algo, label = TRTLLM_PATHS[path]
    rows = []
    for calibration, calib_file in CALIBRATIONS.items():
        checkpoint = work / f"{path}-{calibration}"
        if not (checkpoint / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).eval()
            calibrate_fp8(model, tokenize_prompts(tokenizer, load_prompts(calib_file, calib_size)), False, quant_algo)
            export_checkpoints(model, checkpoint, None, hf_dir)
            del model
        rebuilt = CheckpointModel(checkpoint)
        for heldout, ids in heldouts.items():
            report = run_gate(rebuilt, ids, references[heldout], GateThresholds())
            rows.append({"path": label, "calibration": calibration, "heldout": heldout,
                         "top1_agreement": report.top1_agreement, "perplexity_increase": report.perplexity_increase,
                         "tokens": report.tokens})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder or .gguf (default: the bundled SmolLM2)")
    parser.add_argument("--paths", default="onnx,trtllm", help="comma-separated: onnx, trtllm, trtllm-fp8")
    parser.add_argument("--calib-size", type=int, default=128, help="TensorRT-LLM calibration prompts")
    parser.add_argument("--work", type=Path, default=Path("bench-results/calibration-source"))
    parser.add_argument("--out", type=Path, default=Path("bench-results/calibration_source.json"))
    args = parser.parse_args()
    hf_dir = prepare_hf_model(args.model, cache_dir())
    args.work.mkdir(parents=True, exist_ok=True)
    started, load = time.perf_counter(), os.getloadavg()
    rows = []
    with torch_threads_for_load():
        if "onnx" in args.paths.split(","):
            rows += onnx_rows(hf_dir, args.work)
        for path in TRTLLM_PATHS:
            if path in args.paths.split(","):
                rows += trtllm_rows(hf_dir, args.work, args.calib_size, path)
    print("| path | calibrated on | scored on | top-1 agreement | perplexity vs fp32 | tokens |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['path']} | {row['calibration']} | {row['heldout']} | {row['top1_agreement']:.2%} | "
              f"{row['perplexity_increase']:+.2%} | {row['tokens']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "load_average_at_start": load,
                                    "seconds": round(time.perf_counter() - started)}, indent=2) + "\n")


if __name__ == "__main__":
    main()

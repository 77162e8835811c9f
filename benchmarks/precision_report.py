"""Precisions of the ONNX Runtime engine on SmolLM2-135M-Instruct: export time, fp32 parity with torch, decode-step
latency, greedy agreement with fp32, and whether ONNX Runtime can run bf16 at all.

Rows: fp32 (the export), int8 (what `tritonllm build --precision int8` ships: 8-bit block-quantized weights,
`MatMulNBits`), and with `--compare-dynamic` ONNX Runtime's `quantize_dynamic` (per-channel int8 weights, per-tensor
int8 activations), the quantization this builder did not pick. Latency: one decode step (1 new token per row) at a past
of 150 tokens, sessions measured in turn on the same inputs so machine noise hits all of them alike.

  python benchmarks/precision_report.py [--model PATH] [--prompts 32] [--new-tokens 32] [--compare-dynamic]
                                        [--work DIR] [--out bench-results/precision_report.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from tritonllm.builders.errors import BuildError
from tritonllm.builders.onnx_export import ONNX_FILE, export_decoder
from tritonllm.builders.parity import OnnxDecoderRunner, check_parity, greedy_agreement, sample_prompts
from tritonllm.builders.source import prepare_hf_model
from tritonllm.paths import cache_dir


def bf16_probe() -> str:
    """ONNX Runtime's answer to a one-MatMul bf16 graph on the CPU provider."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(name, TensorProto.BFLOAT16, [4, 4]) for name in ("a", "b")]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "bf16", inputs,
                              [helper.make_tensor_value_info("c", TensorProto.BFLOAT16, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own exception types
        return f"unsupported: {error}"
    return "supported"


def quantize_dynamic_int8(fp32_dir: Path, out_dir: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_dir.mkdir(parents=True)
    quantize_dynamic(fp32_dir / ONNX_FILE, out_dir / ONNX_FILE, weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul"], use_external_data_format=True)
    return out_dir


def decode_latency_ms(onnx_dirs: dict[str, Path], batches: tuple[int, ...], past: int,
                      repeats: int) -> dict[str, dict[int, float]]:
    """Median milliseconds of one decode step per variant and batch size, the variants measured in turn."""
    runners = {name: OnnxDecoderRunner(folder) for name, folder in onnx_dirs.items()}
    first = next(iter(runners.values()))
    rng = np.random.default_rng(0)
    results: dict[str, dict[int, float]] = {name: {} for name in runners}
    for batch in batches:
        cache = [rng.standard_normal((batch, first.kv_heads, past, first.head_dim), dtype=np.float32)
                 for _ in range(2 * first.num_layers)]
        inputs = [np.full((batch, 1), 100, np.int64), np.ones((batch, past + 1), np.int64),
                  np.full((batch, 1), past, np.int64), *cache]
        timings: dict[str, list[float]] = {name: [] for name in runners}
        for round_index in range(repeats + 1):
            for name, runner in runners.items():
                feed = dict(zip(runner.input_names, inputs))
                start = time.perf_counter()
                runner.session.run(runner.output_names, feed)
                if round_index:  # the first round warms up
                    timings[name].append(time.perf_counter() - start)
        for name in runners:
            results[name][batch] = round(1000 * statistics.median(timings[name]), 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder or .gguf (default: the bundled SmolLM2 GGUF)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--past", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compare-dynamic", action="store_true", help="also measure quantize_dynamic int8")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the exports here and reuse them next time (export time is then not measured)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/precision_report.json"))
    args = parser.parse_args()

    hf_dir = prepare_hf_model(args.model, cache_dir())
    report: dict[str, object] = {"model": str(hf_dir), "bf16_probe": bf16_probe()}
    with tempfile.TemporaryDirectory(prefix="precision-report.") as temporary:
        work_dir = args.work or Path(temporary)
        try:
            export_decoder(hf_dir, work_dir / "bf16", "bf16")
        except BuildError as error:
            report["bf16_build"] = str(error)
        variants = {"fp32": work_dir / "fp32", "int8": work_dir / "int8"}
        if not (variants["fp32"] / ONNX_FILE).is_file():
            start = time.perf_counter()
            export_decoder(hf_dir, variants["fp32"])
            report["export_seconds_fp32"] = round(time.perf_counter() - start, 1)
        if not (variants["int8"] / ONNX_FILE).is_file():
            start = time.perf_counter()
            export_decoder(hf_dir, variants["int8"], "int8", fp32_dir=variants["fp32"])
            report["quantize_seconds_int8"] = round(time.perf_counter() - start, 1)
        if args.compare_dynamic:
            variants["int8-dynamic"] = work_dir / "int8-dynamic"
            if not (variants["int8-dynamic"] / ONNX_FILE).is_file():
                quantize_dynamic_int8(variants["fp32"], variants["int8-dynamic"])
        fp32 = variants["fp32"]
        report["onnx_megabytes"] = {name: round(sum(f.stat().st_size for f in folder.iterdir()) / 1e6, 1)
                                    for name, folder in variants.items()}
        parity = {batch: check_parity(hf_dir, fp32, batch=batch, decode_steps=3, tolerance=float("inf"))
                  for batch in (2, 8)}
        report["fp32_parity_max_abs_logit_diff"] = {batch: result.max_abs_logit_diff
                                                    for batch, result in parity.items()}
        report["fp32_parity_same_argmax"] = all(step.same_argmax for r in parity.values() for step in r.steps)
        load_before = os.getloadavg()[0]
        report[f"decode_step_ms_past_{args.past}"] = decode_latency_ms(variants, (1, 8, 16), args.past,
                                                                        args.repeats)
        # Other processes on the machine slow every variant alike; the load says how comparable runs are.
        report["load_average_during_latency"] = [load_before, os.getloadavg()[0]]
        report["cpu_count"] = os.cpu_count()
        prompts = sample_prompts(args.prompts)
        report["greedy_agreement_with_fp32"] = {
            name: round(greedy_agreement(fp32, folder, prompts, args.new_tokens, tokenizer_dir=hf_dir), 4)
            for name, folder in variants.items() if name != "fp32"}
        report["agreement_workload"] = f"{args.prompts} prompts x {args.new_tokens} greedy tokens (teacher-forced)"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

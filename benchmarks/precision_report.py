"""One table for every precision of SmolLM2-135M-Instruct: the ONNX Runtime engine's (fp32, int8, int4 AWQ),
measured through the serving executor (python_backends/onnx_runner.OnnxDecoder): build time, size, fp32 parity with
torch, accuracy vs fp32 on held-out text (teacher-forced top-1 agreement, perplexity), decode-step and prefill
latency, and the share of this CPU's roofline each reaches (memory-bound decode at batch 1, compute-bound prefill);
and the TensorRT-LLM path's (bf16, FP8 recipes, INT4 AWQ) from the gate reports its builds wrote
(`tritonllm build --engine trtllm --quant fp8|int4_awq`: gate_report.json of a published build, or the
<out>.rejected-gate-report.json of a refused search), every attempt of each search a row. No speed is given for the
TensorRT-LLM rows: they run on a GPU (benchmarks/gpu_check.py measures FP8 vs bf16 GEMMs where one is lent).

  python benchmarks/precision_report.py [--model PATH] [--precisions fp32,int8,int4] [--past 200] [--prompt 150]
                                        [--repeats 10] [--work DIR] [--out bench-results/precision_report.json]
                                        [--trtllm-reports REPORT.json,...] [--skip-latency]

Latency rows are measured in turn (A B C A B C ...) on the same inputs so machine noise hits every precision alike.
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
from tritonllm.builders.onnx_graph import DecoderGeometry, write_decoder
from tritonllm.builders.parity import agreement, check_parity
from tritonllm.builders.pipeline import MAX_PERPLEXITY_INCREASE, MIN_TOP1_AGREEMENT
from tritonllm.builders.source import prepare_hf_model
from tritonllm.paths import cache_dir
from tritonllm.python_backends.onnx_runner import ONNX_FILE, OnnxDecoder

# This machine's ceilings (../shared/DESIGN.md): fp32 GEMM peak and two-thread memory read bandwidth.
FP32_GEMM_GFLOPS = 446.0
MEMORY_READ_GBPS = 76.0


def step_latencies(folders: dict[str, Path], batches: tuple[int, ...], past: int, prompt: int,
                   repeats: int) -> dict[str, dict[str, float]]:
    executors = {name: OnnxDecoder(folder, max(batches), past + prompt + repeats + 8) for name, folder in folders.items()}
    rng = np.random.default_rng(0)
    vocab = next(iter(executors.values())).vocab_size
    timings: dict[str, dict[str, list[float]]] = {name: {} for name in executors}
    for _ in range(repeats):
        for name, executor in executors.items():
            start = time.perf_counter()
            executor.prefill(0, [rng.integers(3, vocab, prompt).tolist()])
            timings[name].setdefault(f"prefill_{prompt}_ms", []).append(time.perf_counter() - start)
            for batch in batches:
                executor.pool.lengths[:batch] = past
                ids = rng.integers(3, vocab, batch).tolist()
                start = time.perf_counter()
                executor.decode(ids)
                timings[name].setdefault(f"decode_b{batch}_ms", []).append(time.perf_counter() - start)
    return {name: {key: round(1000 * statistics.median(values), 2) for key, values in rows.items()}
            for name, rows in timings.items()}


def weight_bytes(folder: Path) -> int:
    return sum(file.stat().st_size for file in folder.iterdir() if file.name.startswith(ONNX_FILE))


def trtllm_rows(report_files: list[Path]) -> list[dict]:
    """One row per search attempt of each TensorRT-LLM gate report (published or refused)."""
    rows = []
    for file in report_files:
        report = json.loads(Path(file).read_text())
        attempts = report.get("search") or (report.get("extra") or {}).get("search") or []
        for attempt in attempts:
            rows.append({"engine": "tensorrt_llm", "precision": attempt["recipe"],
                         "top1_agreement": attempt["top1_agreement"],
                         "perplexity_increase": attempt["perplexity_increase"],
                         "gate": "pass" if attempt["passed"] else "refused",
                         "stopped_early": attempt.get("stopped_early", False),
                         "scored_tokens": attempt.get("scored_tokens"), "report": str(file)})
    return rows


def markdown_table(report: dict) -> str:
    """The precision table of a report, ONNX rows then TensorRT-LLM rows."""
    lines = ["| engine | precision | top-1 agreement vs fp32 | perplexity vs fp32 | weights MB | decode b1 ms | "
             "prefill ms | gate |", "|---|---|---|---|---|---|---|---|"]
    accuracy = report.get("vs_fp32_on_heldout_text", {})
    for name, megabytes in report.get("weights_megabytes", {}).items():
        scored = accuracy.get(name, {})
        latency = report.get("latency_ms", {}).get(name, {})
        prefill = next((value for key, value in latency.items() if key.startswith("prefill")), None)
        lines.append(f"| onnxruntime | {name} | {_percent(scored.get('top1_agreement'))} | "
                     f"{_signed(scored.get('perplexity_increase'))} | {megabytes} | {latency.get('decode_b1_ms', '-')} "
                     f"| {prefill if prefill is not None else '-'} | {report.get(f'{name}_gate', '-')} |")
    for row in report.get("trtllm", []):
        early = " (stopped early, bound)" if row["stopped_early"] else ""
        lines.append(f"| tensorrt_llm | {row['precision']} | {_percent(row['top1_agreement'])}{early} | "
                     f"{_signed(row['perplexity_increase'])} | - | GPU | GPU | {row['gate']} |")
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder or .gguf (default: the bundled SmolLM2)")
    parser.add_argument("--precisions", default="fp32,int8,int4")
    parser.add_argument("--past", type=int, default=200)
    parser.add_argument("--prompt", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--work", type=Path, default=None, help="keep the builds here and reuse them next time")
    parser.add_argument("--out", type=Path, default=Path("bench-results/precision_report.json"))
    parser.add_argument("--trtllm-reports", default="", help="comma-separated gate reports of TensorRT-LLM builds")
    parser.add_argument("--skip-latency", action="store_true", help="accuracy and size only")
    args = parser.parse_args()

    hf_dir = prepare_hf_model(args.model, cache_dir())
    report: dict[str, object] = {"model": str(hf_dir), "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="precision-report.") as temporary:
        work = args.work or Path(temporary)
        folders: dict[str, Path] = {}
        for precision in args.precisions.split(","):
            folder = work / precision
            if not (folder / ONNX_FILE).is_file():
                folder.mkdir(parents=True, exist_ok=True)
                start = time.perf_counter()
                try:
                    write_decoder(hf_dir, folder, precision)
                except BuildError as error:
                    report[f"{precision}_build"] = str(error)
                    continue
                report[f"build_seconds_{precision}"] = round(time.perf_counter() - start, 1)
            folders[precision] = folder
        geometry = DecoderGeometry.load(folders["fp32"])
        report["weights_megabytes"] = {name: round(weight_bytes(folder) / 1e6, 1) for name, folder in folders.items()}
        report["fp32_parity_max_abs_logit_diff"] = check_parity(hf_dir, folders["fp32"], batch=4,
                                                                tolerance=float("inf")).max_abs_logit_diff
        report["vs_fp32_on_heldout_text"] = {}
        for name, folder in folders.items():
            if name != "fp32":
                scored = agreement(folders["fp32"], folder, hf_dir)
                report[f"{name}_gate"] = ("pass" if scored.top1_agreement >= MIN_TOP1_AGREEMENT
                                          and scored.perplexity_increase <= MAX_PERPLEXITY_INCREASE else "refused")
                report["vs_fp32_on_heldout_text"][name] = {
                    "top1_agreement": round(scored.top1_agreement, 4),
                    "perplexity_increase": round(scored.perplexity_increase, 4), "scored_tokens": scored.scored_tokens}
        report["fp32_gate"] = "parity"
        report["trtllm"] = trtllm_rows([Path(f) for f in args.trtllm_reports.split(",") if f])
        if args.skip_latency:
            _write(report, args.out)
            return
        load_before = os.getloadavg()[0]
        latencies = step_latencies(folders, (1, 8, 16), args.past, args.prompt, args.repeats)
        report["latency_ms"] = latencies
        report["load_average_during_latency"] = [load_before, os.getloadavg()[0]]
        # Roofline: batch-1 decode reads every weight once; prefill does 2 FLOPs per weight and token in the decoder
        # blocks (attention scores excluded) and runs lm_head for the last position only.
        block_weights = geometry.num_layers * (
            geometry.hidden_size * (geometry.num_heads + 2 * geometry.num_kv_heads) * geometry.head_dim
            + geometry.num_heads * geometry.head_dim * geometry.hidden_size
            + 3 * geometry.hidden_size * geometry.intermediate_size)
        lm_head_weights = geometry.vocab_size * geometry.hidden_size
        report["roofline"] = {}
        for name, rows in latencies.items():
            decode_bound_ms = weight_bytes(folders[name]) / (MEMORY_READ_GBPS * 1e9) * 1000
            flops = 2 * (block_weights * args.prompt + lm_head_weights)
            prefill_gflops = flops / (rows[f"prefill_{args.prompt}_ms"] / 1000) / 1e9
            report["roofline"][name] = {
                "decode_b1_memory_bound_ms": round(decode_bound_ms, 2),
                "decode_b1_share_of_memory_roofline": round(decode_bound_ms / rows["decode_b1_ms"], 3),
                "prefill_gflops_attention_excluded": round(prefill_gflops, 1),
                "prefill_share_of_fp32_gemm_peak": round(prefill_gflops / FP32_GEMM_GFLOPS, 3)}
    _write(report, args.out)


def _write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(markdown_table(report))


if __name__ == "__main__":
    main()

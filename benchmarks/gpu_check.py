"""GPU check of the FP8 path: the accuracy-gate rebuild on real FP8 tensor cores, and FP8 vs BF16 GEMM timings at
SmolLM2-135M's layer shapes.

Two steps, so the GPU machine needs only torch, safetensors and rich (no transformers, no Model Optimizer):

  # here (CPU, the project's venv): a random model with SmolLM2's configuration (fewer layers, smaller vocabulary so
  # the folder stays ~40 MB), calibrated and exported by the same code as `tritonllm build --quant fp8`, plus the
  # unquantized model's scores on held-out sequences
  python benchmarks/gpu_check.py make-assets --assets .gpu_check_assets
  # on the GPU machine (also runs on CPU as a dry run)
  python benchmarks/gpu_check.py run --assets .gpu_check_assets --out results.json

`run` verifies the checkpoint on CPU (exact FP8 emulation) and on CUDA (tensor cores), compares the two, then times
each GEMM of a SmolLM2 layer (q/k/v fused, o, gate/up fused, down, lm_head) for 1..1024 tokens, and prints one table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

try:
    from tritonllm.builders import fp8_verify
except ImportError:  # a bare checkout (the GPU machine has no tritonllm install): import builders/ as a package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from builders import fp8_verify

# SmolLM2-135M-Instruct (Llama architecture), as converted from the bundled GGUF.
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
           "num_hidden_layers": 30, "vocab_size": 49152, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 8192}
ASSET_LAYERS = 6
ASSET_VOCAB = 8192
HELDOUT_SEQUENCES = 24
TOKENS = (1, 16, 64, 256, 1024)
CHECKPOINT = "trtllm_checkpoint"
REFERENCE = "reference.safetensors"


def gemm_shapes() -> list[tuple[str, int, int]]:
    """(name, in_features K, out_features N) of each GEMM in a SmolLM2 decoder layer, and the lm_head."""
    head = SMOLLM2["hidden_size"] // SMOLLM2["num_attention_heads"]
    hidden, inter = SMOLLM2["hidden_size"], SMOLLM2["intermediate_size"]
    qkv = (SMOLLM2["num_attention_heads"] + 2 * SMOLLM2["num_key_value_heads"]) * head
    return [("qkv (fused)", hidden, qkv), ("o_proj", hidden, hidden), ("gate/up (fused)", hidden, 2 * inter),
            ("down_proj", inter, hidden), ("lm_head", hidden, SMOLLM2["vocab_size"])]


def make_assets(assets: Path) -> None:
    """Random SmolLM2-shaped model -> FP8 calibration + export (the build's own functions) + reference scores."""
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM

    from tritonllm.builders.fp8 import calibrate_fp8, export_checkpoints

    torch.manual_seed(0)
    config = LlamaConfig(**{**SMOLLM2, "num_hidden_layers": ASSET_LAYERS, "vocab_size": ASSET_VOCAB},
                         tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, ASSET_VOCAB, (int(length),), generator=generator)
                 for length in torch.randint(16, 160, (HELDOUT_SEQUENCES + 32,), generator=generator)]
    heldout, calibration = sequences[:HELDOUT_SEQUENCES], sequences[HELDOUT_SEQUENCES:]
    reference_model = LlamaForCausalLM(config).eval()
    reference_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    reference = fp8_verify.score_sequences(lambda ids: reference_model(ids).logits, heldout)
    calibrate_fp8(model, calibration, kv_cache_fp8=True)
    assets.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as hf_fp8:  # the HF export is not needed on the GPU machine
        export_checkpoints(model, assets / CHECKPOINT, Path(hf_fp8) / "hf_fp8", Path(hf_fp8))
    save_file({**reference.to_tensors(), **{f"ids.{i}": ids for i, ids in enumerate(heldout)}}, assets / REFERENCE)
    size = sum(p.stat().st_size for p in assets.rglob("*") if p.is_file())
    print(f"wrote {assets} ({size / 2**20:.1f} MiB)")


def verify(assets: Path, device: str, compared_sequences: int = 4) -> dict:
    """The gate on `device`; on CUDA also how far its logits are from the CPU emulation's (same checkpoint, first
    few sequences: the CPU's `_scaled_mm` is exact but slow)."""
    tensors = load_file(assets / REFERENCE)
    sequences = [tensors[f"ids.{i}"] for i in range(sum(1 for k in tensors if k.startswith("ids.")))]
    reference = fp8_verify.TokenScores.from_tensors({k: v for k, v in tensors.items() if not k.startswith("ids.")})
    model = fp8_verify.CheckpointModel(assets / CHECKPOINT, device=device)
    report = fp8_verify.run_gate(model, sequences, reference, fp8_verify.GateThresholds())
    results = {device: {key: getattr(report, key) for key in (
        "top1_agreement", "reference_perplexity", "fp8_perplexity", "perplexity_increase", "tokens", "gemm",
        "compute_dtype", "seconds")}}
    if device == "cuda":
        emulation = fp8_verify.CheckpointModel(assets / CHECKPOINT, device="cpu")
        compared = sequences[:compared_sequences]
        cuda = torch.cat([model.logits(ids.unsqueeze(0)).cpu()[0] for ids in compared])
        cpu = torch.cat([emulation.logits(ids.unsqueeze(0))[0] for ids in compared])
        results["cuda_vs_cpu"] = {"tokens": len(cpu),
                                  "max_abs_diff_over_max_abs": ((cuda - cpu).abs().max() / cpu.abs().max()).item(),
                                  "argmax_agreement": (cuda.argmax(-1) == cpu.argmax(-1)).float().mean().item()}
    return results


def _time_cuda_us(fn, calls: int = 50, repeats: int = 7) -> tuple[float, float]:
    """(graph, eager) microseconds per call: kernel time from a CUDA graph of `calls` launches, and eager time with
    the launch overhead a Python loop adds."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except RuntimeError as error:  # not capturable: fall back to eager timing for both columns
        print(f"CUDA graph capture failed ({error}); timing eagerly")
        graph = None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def measure(run) -> float:
        samples = []
        for _ in range(repeats):
            start.record()
            run()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1000 / calls)
        return statistics.median(samples)

    def eager() -> None:
        for _ in range(calls):
            fn()

    eager_us = measure(eager)
    return (measure(graph.replay) if graph is not None else eager_us), eager_us


def _time_cpu_us(fn, calls: int = 2) -> tuple[float, float]:
    fn()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    per_call = (time.perf_counter() - started) * 1e6 / calls
    return per_call, per_call


def time_gemms(device: str, tokens: tuple[int, ...]) -> list[dict]:
    """BF16 vs FP8 (`torch._scaled_mm`, per-tensor scales, bf16 output) for each SmolLM2 GEMM and token count; FP8
    also with the activation quantization a standalone FP8 linear pays (engines fuse it into the previous kernel)."""
    timer = _time_cuda_us if device == "cuda" else _time_cpu_us
    rows = []
    for name, k, n in gemm_shapes():
        weight = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        weight_scale = weight.abs().max().float() / fp8_verify.FP8_MAX
        weight_fp8 = fp8_verify.quantize_fp8(weight, weight_scale)
        for m in tokens:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            x_scale = x.abs().max().float() / fp8_verify.FP8_MAX
            x_fp8 = fp8_verify.quantize_fp8(x, x_scale)

            def bf16() -> torch.Tensor:
                return torch.nn.functional.linear(x, weight)

            def fp8() -> torch.Tensor:
                return torch._scaled_mm(x_fp8, weight_fp8.t(), scale_a=x_scale, scale_b=weight_scale,
                                        out_dtype=torch.bfloat16)

            def fp8_with_quant() -> torch.Tensor:
                return torch._scaled_mm(fp8_verify.quantize_fp8(x, x_scale), weight_fp8.t(), scale_a=x_scale,
                                        scale_b=weight_scale, out_dtype=torch.bfloat16)

            try:
                (bf16_us, bf16_eager), (fp8_us, fp8_eager), (fp8q_us, _) = (timer(f) for f in (bf16, fp8,
                                                                                                fp8_with_quant))
            except RuntimeError as error:  # a shape the FP8 kernels refuse: say so in the table, time the rest
                print(f"{name} at {m} tokens: {error}")
                continue
            flops = 2 * m * k * n
            rows.append({"gemm": name, "tokens": m, "k": k, "n": n, "bf16_us": bf16_us, "fp8_us": fp8_us,
                         "fp8_with_quant_us": fp8q_us, "speedup": bf16_us / fp8_us,
                         "speedup_with_quant": bf16_us / fp8q_us, "eager_bf16_us": bf16_eager,
                         "eager_fp8_us": fp8_eager, "fp8_tflops": flops / fp8_us / 1e6,
                         "bf16_tflops": flops / bf16_us / 1e6})
    return rows


def print_results(device_name: str, verification: dict, rows: list[dict], timing: str) -> None:
    print(f"\nFP8 gate rebuild ({ASSET_LAYERS}-layer random SmolLM2-shaped model, vocab {ASSET_VOCAB}, FP8 weights + "
          f"activations + KV cache) vs its float32 original:")
    for device, result in verification.items():
        if device == "cuda_vs_cpu":
            print(f"  cuda vs cpu emulation, {result['tokens']} positions: max|diff|/max|cpu| = "
                  f"{result['max_abs_diff_over_max_abs']:.2e}, argmax agreement {result['argmax_agreement']:.2%}")
        else:
            print(f"  {device:4s}: top-1 agreement {result['top1_agreement']:.2%}, perplexity "
                  f"{result['reference_perplexity']:.2f} -> {result['fp8_perplexity']:.2f} "
                  f"({result['perplexity_increase']:+.2%}) over {result['tokens']} tokens; {result['gemm']}, "
                  f"{result['seconds']:.1f} s")
    header = (f"{'GEMM (K x N)':<27}{'tokens':>7}{'bf16 us':>10}{'fp8 us':>10}{'fp8+q us':>10}{'fp8 x':>8}"
              f"{'fp8+q x':>9}{'bf16 TF/s':>11}{'fp8 TF/s':>10}{'eager bf16':>12}{'eager fp8':>11}")
    print(f"\nFP8 vs BF16 GEMMs at SmolLM2-135M's shapes on {device_name} ({timing}; x = bf16 time / fp8 time; "
          f"fp8+q includes quantizing the activation):")
    print(header)
    print("-" * len(header))
    for row in rows:
        label = f"{row['gemm']} ({row['k']}x{row['n']})"
        print(f"{label:<27}{row['tokens']:>7}{row['bf16_us']:>10.1f}{row['fp8_us']:>10.1f}"
              f"{row['fp8_with_quant_us']:>10.1f}{row['speedup']:>8.2f}{row['speedup_with_quant']:>9.2f}"
              f"{row['bf16_tflops']:>11.1f}{row['fp8_tflops']:>10.1f}{row['eager_bf16_us']:>12.1f}"
              f"{row['eager_fp8_us']:>11.1f}")


def run(assets: Path, out: Path | None, tokens: tuple[int, ...]) -> None:
    cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name() if cuda else "cpu, dry run"
    print(f"torch {torch.__version__}, device {device_name}")
    try:
        verification = verify(assets, "cuda" if cuda else "cpu")
    except Exception as error:  # still time the GEMMs: one run on the GPU machine should bring back both parts
        print(f"verification failed: {type(error).__name__}: {error}")
        verification = {}
    rows = time_gemms("cuda" if cuda else "cpu", tokens)
    timing = "median of 7 CUDA-graph replays of 50 calls" if cuda else "wall clock, 2 calls"
    if out is not None:
        out.write_text(json.dumps({"device": device_name, "torch": torch.__version__, "verification": verification,
                                   "gemms": rows, "timing": timing}, indent=2) + "\n")
    print_results(device_name, verification, rows, timing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-assets", help="calibrate and export the random model (needs the project's venv)")
    make.add_argument("--assets", type=Path, required=True)
    check = commands.add_parser("run", help="verify on CPU and CUDA, time the GEMMs, print the table")
    check.add_argument("--assets", type=Path, required=True)
    check.add_argument("--out", type=Path, help="also write the results as JSON here")
    check.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated token counts")
    args = parser.parse_args()
    if args.command == "make-assets":
        make_assets(args.assets)
    else:
        run(args.assets, args.out, tuple(int(t) for t in args.tokens.split(",")))


if __name__ == "__main__":
    main()

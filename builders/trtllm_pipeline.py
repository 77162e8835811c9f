"""`tritonllm build --engine trtllm --quant fp8|int4_awq`: source -> calibration + export + gate (recipe search) ->
trtllm-build -> repository.

Steps 1-3 (builders.fp8) run anywhere, CPU included. Step 4 needs TensorRT-LLM (NGC `tritonserver:<yy.mm>-trtllm-
python-py3`); where it is absent the build stops after the gate with `TensorRTLLMUnavailable`, whose message says how
to finish. Step 5 renders the same repository as the ONNX path with the `tensorrt_llm` model as the engine step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from tritonllm.paths import cache_dir, served_name

from .fp8 import Fp8Result, build_fp8, select_recipes
from .fp8_verify import GateThresholds
from .repository import render_repository
from tritonllm.contract import EngineSettings, RepositorySettings
from .source import content_key, prepare_hf_model
from .trtllm import attention_windows, build_engine


@dataclass(frozen=True)
class TrtllmBuildResult:
    out_dir: Path
    fp8: Fp8Result
    engine_dir: Path
    repository_dir: Path


def build_trtllm(model: str | Path | None, out_dir: Path | None, calib_file: Path | None, calib_size: int,
                 kv_cache_fp8: bool | None, engine: EngineSettings, gate: GateThresholds = GateThresholds(),
                 served_engine_dir: str | None = None, console: Console | None = None,
                 quant: str = "fp8", recipes: list[str] | None = None) -> TrtllmBuildResult:
    """`quant`: fp8 or int4_awq (builders.fp8.QUANTS); `recipes`: only these of its recipes (names; default all).
    `served_engine_dir`: the engine folder as tritonserver will see it (a container path); default: where it is
    built here."""
    console = console or Console(stderr=True)
    chosen = select_recipes(kv_cache_fp8, recipes, quant)  # before the model is prepared: a bad name fails at once
    hf_dir = prepare_hf_model(model, cache_dir(), progress=console.print)
    out_dir = Path(out_dir) if out_dir else cache_dir() / f"trtllm-{quant}-{content_key(hf_dir)[:16]}"
    fp8 = build_fp8(hf_dir, out_dir / quant, calib_file, calib_size, kv_cache_fp8, gate, console, recipes=chosen,
                    quant=quant, reference_cache=cache_dir() / "reference-scores")
    console.print(f"[green]recipe {fp8.report.extra['recipe']} passed the gate[/]: {fp8.checkpoint_dir} "
                  f"(report {fp8.report_path})")
    engine_dir = build_engine(fp8.checkpoint_dir, out_dir / "engine", engine)  # TensorRTLLMUnavailable stops here
    settings = RepositorySettings(tokenizer_dir=hf_dir, trtllm_engine_dir=served_engine_dir or str(engine_dir),
                                  trtllm_attention_windows=attention_windows(fp8.checkpoint_dir, engine),
                                  served_model_name=served_name(model), engine=engine)
    repository = render_repository(settings, out_dir / "repository")
    return TrtllmBuildResult(out_dir, fp8, engine_dir, repository)

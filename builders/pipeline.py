"""`tritonllm build` for the ONNX Runtime engine: source -> ONNX export -> gate -> rendered Triton repository.

Two levels of content-keyed caching under `tritonllm.paths.cache_dir()`:

- artifacts, keyed by what they are made of, shared by every build that needs them:
  `hf-<gguf hash>/` (GGUF converted once), `decoder-<precision>-<key>/` (gated ONNX export: model.onnx,
  decoder.json, gate.json), `draft-<precision>-<key>/` (a speculative draft model's export: not gated, since the
  target verifies every token it drafts; draft.json records its held-out agreement with the target, the greedy
  acceptance to expect), `embedder-<key>/` (the semantic cache's sentence embedder);
- builds, keyed by artifacts + every repository setting + the code that renders: `build-<key>/` laid out as
  docs/architecture.md says (hf/, onnx-<precision>/, draft-onnx/ with a draft, parity.json, repository/,
  build.json), with the artifacts hard-linked in (copied across filesystems). A second build with the same key
  returns at once; a build that only changes a setting re-renders the repository (seconds) on the cached artifacts.

The cache is held to `$TRITONLLM_CACHE_MAX_GB` (builders/cache_budget.py): every build marks what it used and
evicts the least recently used entries beyond that, never one used in the last hour nor a build that a running
tritonserver serves.

Every artifact and build folder is written under a temporary name and renamed into place, so a crash never leaves a
folder that looks finished. Only exports that passed their gate are published (drafts have none to pass).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from tritonllm.paths import TEMPLATES_DIR, bundled_embedder, cache_dir, served_name

from .cache_budget import mark_used, max_bytes_from_environment, prune
from .cache_calibration import Calibration, resolve_threshold
from .errors import BuildError
from .files import atomic_dir, link_tree
from .onnx_graph import GRAPH_PRECISIONS, write_decoder
from .parity import FP32_TOLERANCE, agreement, check_parity
from tritonllm.contract import CacheSettings, EngineSettings, RepositorySettings
from .source import content_key, prepare_hf_model, resolve_source

BUILD_FILE = "build.json"
GATE_FILE = "gate.json"
DRAFT_REPORT_FILE = "draft.json"
DRAFT_FOLDER = "draft-onnx"  # in a build folder
PARITY_FILE = "parity.json"
# Gate of the quantized precisions (int8, int4) against the gated fp32 build, on held-out text (builders/parity.py).
# Measured on SmolLM2-135M: int8 0.957 top-1 agreement, +0.6% perplexity; int4 round-to-nearest 0.60, +37% (refused).
MIN_TOP1_AGREEMENT = 0.9
MAX_PERPLEXITY_INCREASE = 0.05

_BUILDERS_DIR = Path(__file__).resolve().parent
# The code (modules, found by import name) and data files (relative to builders/) each cached result is made by.
EXPORT_CODE = ("tritonllm.builders.source", "tritonllm.builders.onnx_graph", "tritonllm.builders.architecture",
               "tritonllm.builders.awq", "tritonllm.builders.parity",
               "tritonllm.builders.errors", "data/parity_prompts.txt", "data/heldout_prompts.jsonl",
               "tritonllm.python_backends.onnx_runner", "tritonllm.python_backends.kv_slots")
RENDER_CODE = ("tritonllm.builders.pipeline", "tritonllm.builders.repository", "tritonllm.builders.model_config",
               "tritonllm.builders.lint", "tritonllm.builders.files", "tritonllm.contract",
               "tritonllm.builders.embedder")
EMBEDDER_CODE = ("tritonllm.builders.embedder", "tritonllm.python_backends.embedding",
                 "data/embedder_check_sentences.txt")
LIBRARIES = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime")
# RepositorySettings fields a caller may set; the pipeline fills in the artifact paths and takes engine/cache apart.
OVERRIDABLE_SETTINGS = tuple(f.name for f in fields(RepositorySettings)
                             if f.name not in ("tokenizer_dir", "onnx_dir", "trtllm_engine_dir", "engine", "cache",
                                               "draft_onnx_dir"))


@dataclass(frozen=True)
class BuildResult:
    out_dir: Path
    hf_dir: Path
    onnx_dir: Path
    repository_dir: Path
    cached: bool  # True when the whole build was found complete and nothing ran
    key: str
    # the semantic cache's derived cosine floor (None: no cache, or the operator set the floor)
    cache_calibration: dict | None = None
    draft_onnx_dir: Path | None = None  # the speculative draft model's graph (None: built without one)


def build(model: str | Path | None = None, out_dir: Path | None = None, precision: str = "fp32",
          console: Any = None, engine: EngineSettings | None = None, cache: CacheSettings | None = None,
          calibration_file: Path | None = None, draft: str | None = None, draft_model: str | Path | None = None,
          **repository_overrides: Any) -> BuildResult:
    """Build `model` (None: the bundled SmolLM2 GGUF; a .gguf file; an HF folder) for the ONNX Runtime engine.

    `draft` (a precision) / `draft_model` (a .gguf file or HF folder sharing the tokenizer; default: `model`
    itself) add a speculative draft model: `draft="int4"` alone is the quantized self-draft; `draft_model` alone
    drafts in int8. A draft whose vocabulary differs from the target's is refused. With a draft, requests speculate
    with it by default (engine.speculative_drafter "draft_model") unless `engine` names another drafter.

    `engine` / `cache` / `repository_overrides` (other RepositorySettings fields, e.g. served_model_name) shape the
    rendered repository; `engine.precision` must equal `precision`. `calibration_file`: the prompts int4's AWQ
    scales are calibrated on (JSONL, e.g. captured traffic; default: the bundled calibration prompts). `console` (a
    rich Console) shows one progress line per step; None builds quietly. Raises BuildError (or SettingsError for out-of-range settings).
    """
    if precision not in GRAPH_PRECISIONS:
        raise BuildError(f"precision = {precision!r} is not supported; allowed: {', '.join(GRAPH_PRECISIONS)}")
    if calibration_file is not None and precision != "int4":
        raise BuildError(f"a calibration file is used by precision int4 (AWQ) only; precision {precision} "
                         f"calibrates nothing")
    if draft_model is not None and draft is None:
        draft = "int8"
    if draft is not None and draft not in GRAPH_PRECISIONS:
        raise BuildError(f"draft = {draft!r} is not supported; allowed: {', '.join(GRAPH_PRECISIONS)} (the draft "
                         f"model's precision)")
    engine = engine or EngineSettings(precision=precision)
    if draft is not None and engine.speculative_drafter == "off":
        engine = replace(engine, speculative_drafter="draft_model")
    if engine.kind != "onnxruntime" or engine.precision != precision:
        raise BuildError(f"this pipeline builds the onnxruntime engine in {precision}; got engine kind "
                         f"{engine.kind!r}, precision {engine.precision!r}")
    unknown = set(repository_overrides) - set(OVERRIDABLE_SETTINGS)
    if unknown:
        raise BuildError(f"unknown build settings {sorted(unknown)}; allowed: engine, cache, "
                         f"{', '.join(OVERRIDABLE_SETTINGS)}")
    repository_overrides.setdefault("served_model_name", served_name(model))
    cache = cache or CacheSettings()
    engine.validate()  # fail on bad settings before minutes of export
    cache.validate()
    root = cache_dir()
    max_cache_bytes = max_bytes_from_environment()
    prune(root, max_cache_bytes)  # make room before this build adds to the cache

    with _steps(console) as step:
        with step("model source") as note:
            source = resolve_source(model)
            hf_dir = prepare_hf_model(source, root, progress=note)
            mark_used(root, [source, hf_dir])  # at once: a concurrent build's prune must not take it now
            source_key = content_key(source)  # the GGUF file or the HF folder itself
        embedder_dir = repository_overrides.pop("embedder_dir", None)
        embedder_dir = Path(embedder_dir) if embedder_dir is not None else None
        if embedder_dir is None and cache.enabled:
            with step("sentence embedder (semantic cache)"):
                embedder_dir = _embedder_artifact(root)
                mark_used(root, [embedder_dir])
        calibration = None
        if embedder_dir is not None and cache.enabled:
            with step(f"cache threshold for a false-hit budget of {cache.max_false_hit_rate}"):
                cache, calibration = resolve_threshold(cache, embedder_dir)
        draft_source = None
        if draft is not None:
            with step("draft model source") as note:
                draft_path = source if draft_model is None else Path(draft_model).expanduser()
                draft_source = (prepare_hf_model(draft_path, root, progress=note), content_key(draft_path))
                mark_used(root, [draft_path, draft_source[0]])
                check_draft_vocabulary(hf_dir, draft_source[0])
        settings = RepositorySettings(tokenizer_dir=hf_dir, onnx_dir=None, embedder_dir=embedder_dir,
                                      engine=engine, cache=cache, **repository_overrides)
        calibration_key = _calibration_key(calibration_file)
        draft_key = "no draft" if draft_source is None else _export_key(draft_source[1], draft)
        build_key = _hash(_export_key(source_key, precision, calibration_key), _settings_fingerprint(settings),
                          draft_key,
                          _code_version(RENDER_CODE), _templates_version(),
                          content_key(embedder_dir) if embedder_dir else "no embedder")
        layout = _Layout(Path(out_dir) if out_dir is not None else root / f"build-{build_key[:16]}", precision)
        finished = _finished_build(layout, build_key)
        if finished is not None:
            step.skip_all("cached build", layout.out_dir)
            _record_use(root, layout, source, max_cache_bytes)
            return finished

        with step(f"ONNX graph + gate ({precision})") as note:
            decoder_dir = _decoder_artifact(hf_dir, source_key, precision, root, note, calibration_file)
            mark_used(root, [decoder_dir])
        draft_dir = None
        if draft_source is not None:
            with step(f"draft model graph ({draft}) + its agreement with the target") as note:
                draft_dir = _draft_artifact(*draft_source, draft, decoder_dir, hf_dir, root, note)
                mark_used(root, [draft_dir])
        with step("Triton model repository"):
            result = _assemble(layout, hf_dir, decoder_dir, embedder_dir, settings, build_key, calibration, draft_dir)
    _record_use(root, layout, source, max_cache_bytes)
    return result


def _record_use(root: Path, layout: "_Layout", source: Path, max_cache_bytes: int) -> None:
    """Mark the build's folder and the artifacts its record names as just used, then hold the cache to its budget
    (what was just used is kept: builders/cache_budget.py)."""
    record = json.loads(layout.build_file.read_text())
    mark_used(root, [layout.out_dir, source, *(Path(record[name]) for name in
                                                ("source", "decoder_artifact", "embedder_artifact", "draft_artifact")
                                                if record.get(name))])
    prune(root, max_cache_bytes)


class _Layout:
    """Paths of a build folder (docs/architecture.md: build output)."""

    def __init__(self, out_dir: Path, precision: str) -> None:
        self.out_dir = out_dir
        self.hf = out_dir / "hf"
        self.onnx = out_dir / f"onnx-{precision}"
        self.draft = out_dir / DRAFT_FOLDER
        self.parity = out_dir / PARITY_FILE
        self.repository = out_dir / "repository"
        self.build_file = out_dir / BUILD_FILE

    def result(self, key: str, cached: bool) -> BuildResult:
        calibration = json.loads(self.build_file.read_text()).get("cache_calibration")  # the build report's
        return BuildResult(self.out_dir, self.hf, self.onnx, self.repository, cached, key, calibration,
                           self.draft if self.draft.is_dir() else None)


def _finished_build(layout: _Layout, key: str) -> BuildResult | None:
    """The build in `layout.out_dir` when it is complete with this key; raise if the folder is something else."""
    if layout.build_file.is_file():
        recorded = json.loads(layout.build_file.read_text())
        if recorded.get("key") == key and all(path.exists() for path in
                                              (layout.hf, layout.onnx, layout.parity, layout.repository)):
            return layout.result(key, cached=True)
        return None
    if layout.out_dir.exists() and any(layout.out_dir.iterdir()):
        raise BuildError(f"out_dir {layout.out_dir} exists and is not a tritonllm build (no {BUILD_FILE}); "
                         f"allowed: a new or empty folder, or an earlier build's folder")
    return None


def _assemble(layout: _Layout, hf_dir: Path, decoder_dir: Path, embedder_dir: Path | None,
              settings: RepositorySettings, key: str, calibration: Calibration | None,
              draft_dir: Path | None = None) -> BuildResult:
    """Write the build folder under a temporary name (artifacts hard-linked), render, then swap it into place."""
    from .repository import render_repository

    # An earlier build in out_dir (checked by _finished_build) is retired only once the new one is whole.
    with atomic_dir(layout.out_dir) as staging:
        staged = _Layout(staging, settings.engine.precision)
        link_tree(hf_dir, staged.hf)
        link_tree(decoder_dir, staged.onnx, skip=(GATE_FILE,))
        shutil.copyfile(decoder_dir / GATE_FILE, staged.parity)
        if draft_dir is not None:
            link_tree(draft_dir, staged.draft)
        # Render from the staged copies, so the repository's files are links to the build's own.
        render_repository(replace(settings, tokenizer_dir=staged.hf, onnx_dir=staged.onnx,
                                  draft_onnx_dir=staged.draft if draft_dir is not None else None), staged.repository)
        record = {"key": key, "precision": settings.engine.precision, "source": str(hf_dir),
                  "decoder_artifact": str(decoder_dir), "embedder_artifact": str(embedder_dir or ""),
                  "draft_artifact": str(draft_dir or ""),
                  "draft": json.loads((draft_dir / DRAFT_REPORT_FILE).read_text()) if draft_dir else None,
                  "settings": json.loads(_settings_fingerprint(settings)),
                  "cache_calibration": asdict(calibration) if calibration else None,
                  "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        staged.build_file.write_text(json.dumps(record, indent=2) + "\n")
    return layout.result(key, cached=False)


def _calibration_key(calibration_file: Path | None) -> str:
    return content_key(Path(calibration_file)) if calibration_file is not None else "bundled"


def _export_key(source_key: str, precision: str, calibration_key: str = "bundled") -> str:
    # The bundled calibration keeps the key it always had, so existing cached graphs stay valid.
    extra = () if calibration_key == "bundled" else (calibration_key,)
    return _hash(source_key, precision, *extra, _code_version(EXPORT_CODE), _library_versions())


def _decoder_artifact(hf_dir: Path, source_key: str, precision: str, root: Path,
                      note: Callable[[str], None], calibration_file: Path | None = None) -> Path:
    """The gated decoder graph for `precision` (a quantized one is gated against the gated fp32 graph)."""
    calibration_key = _calibration_key(calibration_file)
    target = root / f"decoder-{precision}-{_export_key(source_key, precision, calibration_key)[:16]}"
    if (target / GATE_FILE).is_file():
        return target
    fp32_dir = None if precision == "fp32" else _decoder_artifact(hf_dir, source_key, "fp32", root, note)
    with atomic_dir(target, replace=False) as candidate:  # another build that published this key first wins
        note(f"building the {precision} graph")
        write_decoder(hf_dir, candidate, precision, calibration_file)
        if fp32_dir is None:
            note("parity with torch fp32")
            gate = json.loads(check_parity(hf_dir, candidate, batch=4, decode_steps=3,
                                           tolerance=FP32_TOLERANCE).to_json())
        else:
            note(f"{precision} vs fp32 on held-out text (top-1 agreement, perplexity)")
            report = agreement(fp32_dir, candidate, hf_dir)
            gate = {**asdict(report), "perplexity_increase": report.perplexity_increase,
                    "min_top1_agreement": MIN_TOP1_AGREEMENT, "max_perplexity_increase": MAX_PERPLEXITY_INCREASE,
                    "passed": (report.top1_agreement >= MIN_TOP1_AGREEMENT
                               and report.perplexity_increase <= MAX_PERPLEXITY_INCREASE),
                    "fp32_parity": json.loads((fp32_dir / GATE_FILE).read_text())}
            if not gate["passed"]:
                raise BuildError(
                    f"{precision} gate failed: top-1 agreement with fp32 {report.top1_agreement:.3f} (required >= "
                    f"{MIN_TOP1_AGREEMENT}), perplexity {report.perplexity_increase:+.1%} (allowed <= "
                    f"{MAX_PERPLEXITY_INCREASE:+.0%}) over {report.scored_tokens} held-out tokens; "
                    f"choose another precision")
        (candidate / GATE_FILE).write_text(json.dumps(gate, indent=2) + "\n")
        for file in candidate.iterdir():
            file.chmod(0o644)  # the server may run as another user
    return target


def _draft_artifact(draft_hf_dir: Path, draft_source_key: str, precision: str, target_decoder_dir: Path,
                    target_hf_dir: Path, root: Path, note: Callable[[str], None]) -> Path:
    """The draft model's graph in `precision`, with its teacher-forced top-1 agreement with the target on held-out
    text (the acceptance rate greedy drafting can expect) in draft.json. Not gated: a poor draft costs speed only."""
    # The target's artifact folder name is its content key (the agreement depends on it).
    key = _hash(_export_key(draft_source_key, precision), target_decoder_dir.name)
    target = root / f"draft-{precision}-{key[:16]}"
    if (target / DRAFT_REPORT_FILE).is_file():
        return target
    with atomic_dir(target, replace=False) as candidate:
        note(f"building the draft's {precision} graph")
        write_decoder(draft_hf_dir, candidate, precision)
        note("draft vs target on held-out text (top-1 agreement)")
        report = agreement(target_decoder_dir, candidate, target_hf_dir)
        (candidate / DRAFT_REPORT_FILE).write_text(json.dumps(
            {"precision": precision, "top1_agreement_with_target": report.top1_agreement,
             "scored_tokens": report.scored_tokens}, indent=2) + "\n")
        for file in candidate.iterdir():
            file.chmod(0o644)
    return target


def check_draft_vocabulary(target_hf_dir: Path, draft_hf_dir: Path) -> None:
    """Raise BuildError unless the draft's tokenizer maps every token to the same id as the target's (drafted ids
    are verified as the target's own)."""
    from tokenizers import Tokenizer

    vocabularies = [Tokenizer.from_file(str(Path(folder) / "tokenizer.json")).get_vocab(with_added_tokens=True)
                    for folder in (target_hf_dir, draft_hf_dir)]
    if vocabularies[0] != vocabularies[1]:
        target, draft = vocabularies
        differing = sorted(set(target.items()) ^ set(draft.items()))
        raise BuildError(f"the draft model's vocabulary differs from the target's ({len(draft)} vs {len(target)} "
                         f"tokens, {len(differing)} token/id pairs not in both, e.g. {differing[:3]}); allowed: a "
                         f"draft model with the target's tokenizer")


def _embedder_artifact(root: Path) -> Path:
    from .embedder import export_embedder

    source = bundled_embedder()
    code = _code_version(EMBEDDER_CODE)
    target = root / f"embedder-{_hash(content_key(source), code)[:16]}"
    if not target.is_dir():
        export_embedder(target, source, replace=False)  # another build that published this key first wins
    return target


def _hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _code_version(sources: tuple[str, ...]) -> str:
    """Hash of the named modules' source files and of data files (names with a '/') under builders/."""
    return _hash(*(content_key(_BUILDERS_DIR / source if "/" in source else _module_file(source))
                   for source in sources))


def _module_file(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise BuildError(f"cannot fingerprint the build code: module {module} not found")
    return Path(spec.origin)


def _templates_version() -> str:
    """The repository templates and adapters (Python caches excluded: they change when Python compiles)."""
    digest = hashlib.sha256()
    for file in sorted(TEMPLATES_DIR.rglob("*")):
        if file.is_file() and "__pycache__" not in file.parts:
            digest.update(file.relative_to(TEMPLATES_DIR).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def _library_versions() -> str:
    from importlib.metadata import version

    return ",".join(f"{name}=={version(name)}" for name in LIBRARIES)


def _settings_fingerprint(settings: RepositorySettings) -> str:
    """The settings that shape the repository, paths left out (they are keyed by content elsewhere)."""
    def plain(value: Any) -> Any:
        if is_dataclass(value):
            return {key: plain(item) for key, item in asdict(value).items()}
        return str(value) if isinstance(value, Path) else value

    values = plain(settings)
    for path_field in ("tokenizer_dir", "onnx_dir", "embedder_dir"):
        values.pop(path_field)
    return json.dumps(values, sort_keys=True)


class _StepRunner:
    """`with step("name") as note:` shows one progress line per step; `note(text)` updates it."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress

    @contextmanager
    def __call__(self, name: str) -> Iterator[Callable[[str], None]]:
        if self.progress is None:
            yield lambda text: None
            return
        task = self.progress.add_task(name, total=1)

        def note(text: str) -> None:
            self.progress.update(task, description=f"{name}: {text}")

        try:
            yield note
        except BaseException:
            self.progress.update(task, description=f"[red]{name}: failed")
            raise
        self.progress.update(task, description=name, completed=1)

    def skip_all(self, name: str, out_dir: Path) -> None:
        if self.progress is not None:
            task = self.progress.add_task(f"{name}: {out_dir}", total=1)
            self.progress.update(task, completed=1)


@contextmanager
def _steps(console: Any) -> Iterator[_StepRunner]:
    if console is None:
        yield _StepRunner(None)
        return
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(finished_text="[green]✓"), TextColumn("{task.description}"), BarColumn(bar_width=None),
                  TimeElapsedColumn(), console=console) as progress:
        yield _StepRunner(progress)

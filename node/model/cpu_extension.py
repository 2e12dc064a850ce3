"""node's MLX CPU extension: primitives the CPU backend has no fast path for.

`native/cpu_ops.cpp` (the module), `native/int8_matmul.cpp` (x @ W^T with int8 weights,
`node.model.int8_weights`) and `native/decode_attention.cpp` (one-query attention for decode
steps) and `native/norm_rope.cpp` (RMS norm and RoPE as one operation each) and `native/attention_inputs.cpp`
(a decode step's q, k, v with their norms and rotation as one operation) and
`native/decode_blocks.cpp` (Gemma's attention output and MLP with their norms and residuals as one
operation each; all used by `node.model.cpu_kernels`) are compiled together with nanobind against the installed mlx's
headers, once per source, MLX and nanobind version, and cached under
`~/.cache/persistent-agent-node/native/`. Each kernel picks its instruction set at run time. Where
no C++ compiler or nanobind exists the module is None, `failure()` says why, and the model keeps
MLX's own paths.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

import mlx.core as mx

from node.config import user_cache_dir
from node.model import blas

logger = logging.getLogger(__name__)

NATIVE = Path(__file__).parent / "native"
SOURCES = [
    NATIVE / name
    for name in (
        "cpu_ops.cpp",
        "int8_matmul.cpp",
        "decode_attention.cpp",
        "norm_rope.cpp",
        "attention_inputs.cpp",
        "decode_blocks.cpp",
        "argmax.cpp",
    )
]
HEADERS = [NATIVE / name for name in ("pool.h", "mlx_inputs.h", "kernels.h")]
MODULE_NAME = "_node_cpu_ops"
FLAGS = [
    "-O3",
    "-std=gnu++20",
    "-shared",
    "-fPIC",
    "-fno-strict-aliasing",
    "-DNDEBUG",
    "-DNB_COMPACT_ASSERTIONS",
    "-DNB_DOMAIN=mlx",
    "-pthread",
]

_extension: ModuleType | None = None
_failure: str | None = None


def compiler() -> str | None:
    found = (shutil.which(name) for name in (os.environ.get("CXX"), "c++", "g++", "clang++") if name)
    return next((path for path in found if path), None)


def _build_inputs() -> tuple[list[str], list[str], str]:
    """Include folders, nanobind's sources and a digest of what the build depends on."""
    import nanobind

    mlx_root = Path(mx.__file__).parent
    includes = [
        sysconfig.get_paths()["include"],
        nanobind.include_dir(),
        str(Path(nanobind.source_dir()).parent / "ext" / "robin_map" / "include"),
        str(mlx_root / "include"),
    ]
    digest = hashlib.sha256()
    for path in SOURCES + HEADERS:
        digest.update(path.read_bytes())
    digest.update(
        f"{mx.__version__} {nanobind.__version__} {sysconfig.get_config_var('SOABI')} {FLAGS}".encode()
    )
    return includes, [str(Path(nanobind.source_dir()) / "nb_combined.cpp")], digest.hexdigest()[:16]


def build(cache_dir: Path | None = None) -> Path:
    """Compile the extension once per source, MLX and nanobind version; raises RuntimeError."""
    try:
        includes, nanobind_sources, digest = _build_inputs()
    except ImportError as e:
        raise RuntimeError(f"cannot build node's CPU kernels: {e} (pip install nanobind)") from e
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    target = (cache_dir or user_cache_dir() / "native") / f"cpu-ops-{digest}" / f"{MODULE_NAME}{suffix}"
    if target.exists():
        return target
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (c++, g++, clang++)")
    mlx_lib = Path(mx.__file__).parent / "lib"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        command = [
            cxx, *FLAGS,
            *(f"-I{path}" for path in includes),
            *(str(source) for source in SOURCES), *nanobind_sources,
            f"-L{mlx_lib}", "-lmlx", f"-Wl,-rpath,{mlx_lib}", "-o", str(built),
        ]  # fmt: skip
        try:
            result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.SubprocessError) as e:
            raise RuntimeError(f"building node's CPU kernels failed: {e}") from e
        if result.returncode != 0:
            raise RuntimeError(f"building node's CPU kernels failed: {result.stderr.strip()[-800:]}")
        os.replace(built, target)
    return target


def extension() -> ModuleType | None:
    """The compiled module, built on first use; None (and the reason in `failure()`) without it."""
    global _extension, _failure
    if _extension is None and _failure is None:
        try:
            path = build()
            spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _check(module)
            module.set_threads(blas.blas_threads())
            _extension = module
        except (RuntimeError, ImportError, OSError, TypeError) as e:
            _failure = str(e)
            logger.warning("node's CPU kernels unavailable, MLX's own paths run instead: %s", e)
    return _extension


def _check(module: ModuleType) -> None:
    """One small product: a nanobind whose internals differ from mlx's cannot take mlx arrays."""
    block = module.BLOCK
    try:
        q, scales = module.quantize(mx.ones((1, block)))
        result = module.int8_matmul(mx.ones((1, block)), q, scales).item()
    except TypeError as e:
        raise RuntimeError(f"the extension cannot exchange arrays with mlx {mx.__version__}: {e}") from e
    if abs(result - block) > 1e-3:
        raise RuntimeError(f"the extension's self-check computed {result}, not {block}")


def failure() -> str | None:
    return _failure


def set_threads(threads: int) -> None:
    if _extension is not None:
        _extension.set_threads(int(threads))

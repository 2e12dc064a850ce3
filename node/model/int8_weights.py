"""Decode with int8 weights on the CPU backend.

A decode step reads every weight once, so its speed is the weight bytes over the memory
bandwidth: Gemma 3 270M in fp32 streams ~1.07 GB per token (the 262144 x 640 lm_head, tied to
the embeddings, 671 MB of it). int8 with one fp32 scale per block of 64 inputs is 1.06 bytes per
weight, ~0.29 GB per token. MLX's CPU backend has no fast reduced-precision product, so
`native/int8_matmul.cpp` is an MLX primitive with its own CPU kernels (AVX-512F, AVX2+FMA or
portable, picked at run time); prefill-sized products dequantize once per call and go to
OpenBLAS's sgemm, so prefill keeps fp32 BLAS speed.

`quantize_model(model)` replaces the model's `nn.Linear` layers and its embedding (which Gemma
also uses as its lm_head) in place: the fp32 arrays are dropped, never held beside the int8 ones.
The extension is compiled once per source version (C++ compiler, nanobind, MLX's headers); where
that fails the model keeps its fp32 weights, and the node says why. NODE_INT8_WEIGHTS=0 keeps fp32.
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
from mlx import nn
from mlx.utils import tree_unflatten

from node.config import user_cache_dir
from node.model import blas

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "native" / "int8_matmul.cpp"
MODULE_NAME = "_node_int8"
BLOCK = 64
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


def _compiler() -> str | None:
    found = (shutil.which(name) for name in (os.environ.get("CXX"), "c++", "g++", "clang++") if name)
    return next((path for path in found if path), None)


def _build_inputs() -> tuple[list[str], list[str], str]:
    """Include folders, extra sources and a digest of what the build depends on."""
    import nanobind

    mlx_root = Path(mx.__file__).parent
    includes = [
        sysconfig.get_paths()["include"],
        nanobind.include_dir(),
        str(Path(nanobind.source_dir()).parent / "ext" / "robin_map" / "include"),
        str(mlx_root / "include"),
    ]
    sources = [str(Path(nanobind.source_dir()) / "nb_combined.cpp")]
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(
        f"{mx.__version__} {nanobind.__version__} {sysconfig.get_config_var('SOABI')} {FLAGS}".encode()
    )
    return includes, sources, digest.hexdigest()[:16]


def build(cache_dir: Path | None = None) -> Path:
    """Compile the extension once per source, MLX and nanobind version; raises RuntimeError."""
    try:
        includes, sources, digest = _build_inputs()
    except ImportError as e:
        raise RuntimeError(f"cannot build {SOURCE.name}: {e} (pip install nanobind)") from e
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    target = (cache_dir or user_cache_dir() / "native") / f"int8-{digest}" / f"{MODULE_NAME}{suffix}"
    if target.exists():
        return target
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (c++, g++, clang++)")
    mlx_lib = Path(mx.__file__).parent / "lib"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        command = [
            compiler, *FLAGS,
            *(f"-I{path}" for path in includes),
            str(SOURCE), *sources,
            f"-L{mlx_lib}", "-lmlx", f"-Wl,-rpath,{mlx_lib}", "-o", str(built),
        ]  # fmt: skip
        try:
            result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:
            raise RuntimeError(f"building {SOURCE.name} failed: {e}") from e
        if result.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} failed: {result.stderr.strip()[-800:]}")
        os.replace(built, target)
    return target


def extension() -> ModuleType | None:
    """The compiled extension, built on first use; None (and the reason in `failure()`) without it."""
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
            logger.warning("int8 decode weights unavailable, keeping fp32: %s", e)
    return _extension


def _check(module: ModuleType) -> None:
    """One small product: a nanobind whose internals differ from mlx's cannot take mlx arrays."""
    try:
        q, scales = module.quantize(mx.ones((1, BLOCK)))
        result = module.int8_matmul(mx.ones((1, BLOCK)), q, scales).item()
    except TypeError as e:
        raise RuntimeError(f"the extension cannot exchange arrays with mlx {mx.__version__}: {e}") from e
    if abs(result - BLOCK) > 1e-3:
        raise RuntimeError(f"the extension's self-check computed {result}, not {BLOCK}")


def failure() -> str | None:
    return _failure


def dequantize(weight: mx.array, scales: mx.array) -> mx.array:
    """The float32 matrix int8 `weight` with per-block `scales` stands for."""
    rows, inputs = weight.shape
    blocks = weight.astype(mx.float32).reshape(rows, inputs // BLOCK, BLOCK) * scales[..., None]
    return blocks.reshape(rows, inputs)


class Int8Linear(nn.Module):
    """`nn.Linear` (no bias) with int8 weights; x @ W^T by the native kernel."""

    def __init__(self, weight: mx.array) -> None:
        super().__init__()
        self.weight, self.scales = _extension.quantize(weight)

    def __call__(self, x: mx.array) -> mx.array:
        return _extension.int8_matmul(x, self.weight, self.scales)


class Int8Embedding(nn.Module):
    """`nn.Embedding` with int8 rows; `as_linear` (a tied lm_head) by the native kernel."""

    def __init__(self, weight: mx.array) -> None:
        super().__init__()
        self.weight, self.scales = _extension.quantize(weight)

    def __call__(self, ids: mx.array) -> mx.array:
        rows = self.weight[ids].astype(mx.float32)
        shape = rows.shape
        blocks = rows.reshape(*shape[:-1], shape[-1] // BLOCK, BLOCK) * self.scales[ids][..., None]
        return blocks.reshape(shape)

    def as_linear(self, x: mx.array) -> mx.array:
        return _extension.int8_matmul(x, self.weight, self.scales)


def _replacement(module: nn.Module) -> nn.Module | None:
    if type(module) is nn.Linear and "bias" not in module and module.weight.shape[1] % BLOCK == 0:
        return Int8Linear(module.weight)
    if type(module) is nn.Embedding and module.weight.shape[1] % BLOCK == 0:
        return Int8Embedding(module.weight)
    return None


def quantize_model(model: nn.Module) -> int:
    """Replace the fp32 linear layers and embeddings of `model` in place; returns how many."""
    if extension() is None:
        return 0
    replacements = []
    for path, module in model.named_modules():
        new = _replacement(module)
        if new is not None:
            replacements.append((path, new))
    model.update_modules(tree_unflatten(replacements))
    return len(replacements)


def set_threads(threads: int) -> None:
    if _extension is not None:
        _extension.set_threads(int(threads))


def describe() -> str:
    if _extension is None:
        return f"unavailable ({_failure})" if _failure else "not loaded"
    return f"fp32 scale per {BLOCK} inputs, kernel {_extension.isa()}, {_extension.threads()} threads"

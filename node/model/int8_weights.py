"""Decode with int8 weights on the CPU backend.

A decode step reads every weight once, so its speed is the weight bytes over the memory
bandwidth: Gemma 3 270M in fp32 streams ~1.07 GB per token (the 262144 x 640 lm_head, tied to
the embeddings, 671 MB of it). int8 with one fp32 scale per block of 64 inputs is 1.06 bytes per
weight, ~0.29 GB per token. MLX's CPU backend has no fast reduced-precision product, so
`native/int8_matmul.cpp` (in node's CPU extension, `node.model.cpu_extension`) is an MLX primitive
with its own CPU kernels (AVX-512F, AVX2+FMA or portable, picked at run time); prefill-sized
products dequantize once per call and go to OpenBLAS's sgemm, so prefill keeps fp32 BLAS speed.

Where the kernel for this CPU reads them so (AVX-512 VNNI), a matrix's outputs are packed in panels
of 16 (see "Layout" in int8_matmul.cpp); `row_major` and the native embedding lookup read either layout.

`quantize_model(model)` replaces the model's `nn.Linear` layers and its embedding (which Gemma
also uses as its lm_head) in place: the fp32 arrays are dropped, never held beside the int8 ones.
Where the extension cannot be built the model keeps its fp32 weights, and the node says why. NODE_INT8_WEIGHTS=0 keeps fp32.
"""

from __future__ import annotations

import logging
from types import ModuleType

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_unflatten

from node.model import cpu_extension

logger = logging.getLogger(__name__)

BLOCK = 64

_failure: str | None = None


def extension() -> ModuleType | None:
    """node's CPU extension, which holds the int8 kernel; None (and why in `failure()`) without it."""
    global _failure
    module = cpu_extension.extension()
    if module is None and _failure is None:
        _failure = cpu_extension.failure()
        logger.warning("int8 decode weights unavailable, keeping fp32: %s", _failure)
    return module


def failure() -> str | None:
    return _failure


def row_major(weight: mx.array, scales: mx.array) -> tuple[mx.array, mx.array]:
    """`quantize`'s int8 weights and scales as (N, K) and (N, K / BLOCK) rows, packed or not."""
    rows, inputs = weight.shape
    if not cpu_extension.extension().packed(rows):
        return weight, scales
    panel = cpu_extension.extension().PANEL
    weight = weight.reshape(rows // panel, inputs // 4, panel, 4).transpose(0, 2, 1, 3)
    scales = scales.reshape(rows // panel, inputs // BLOCK, panel).transpose(0, 2, 1)
    return weight.reshape(rows, inputs), scales.reshape(rows, inputs // BLOCK)


def dequantize(weight: mx.array, scales: mx.array) -> mx.array:
    """The float32 matrix int8 `weight` with per-block `scales` stands for."""
    weight, scales = row_major(weight, scales)
    rows, inputs = weight.shape
    blocks = weight.astype(mx.float32).reshape(rows, inputs // BLOCK, BLOCK) * scales[..., None]
    return blocks.reshape(rows, inputs)


class Int8Linear(nn.Module):
    """`nn.Linear` (no bias) with int8 weights; x @ W^T by the native kernel."""

    def __init__(self, weight: mx.array) -> None:
        super().__init__()
        self.weight, self.scales = cpu_extension.extension().quantize(weight)

    def __call__(self, x: mx.array) -> mx.array:
        return cpu_extension.extension().int8_matmul(x, self.weight, self.scales)


class Int8Embedding(nn.Module):
    """`nn.Embedding` with int8 rows; `as_linear` (a tied lm_head) by the native kernel."""

    def __init__(self, weight: mx.array) -> None:
        super().__init__()
        self.weight, self.scales = cpu_extension.extension().quantize(weight)

    def __call__(self, ids: mx.array) -> mx.array:
        return cpu_extension.extension().int8_rows(self.weight, self.scales, ids)

    def as_linear(self, x: mx.array) -> mx.array:
        return cpu_extension.extension().int8_matmul(x, self.weight, self.scales)


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


def describe() -> str:
    module = cpu_extension.extension()
    if module is None:
        return f"unavailable ({_failure})" if _failure else "not loaded"
    packed = f", outputs packed in panels of {module.PANEL}" if module.packed(module.PANEL) else ""
    return f"fp32 scale per {BLOCK} inputs, kernel {module.isa()}{packed}, {module.threads()} threads"

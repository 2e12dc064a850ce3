"""KV rows in their storage dtype: fp32 -> fp16 / bf16 / int8 on save, back to fp32 on restore.

Both directions of fp16 run in `native/kv_decode.c` (F16C where the CPU has it; numpy converts
fp16 one value at a time), decoding straight into the destination, which a restore points at the
caches' own memory: one pass over the stored bytes, no copy after. Without a C compiler numpy does
the same, several times slower.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

from node import native

_FP16_MAX = 65504.0
_SOURCE = Path(__file__).parent / "native" / "kv_decode.c"


def encode(rows: np.ndarray, storage: str) -> tuple[str, dict[str, np.ndarray]]:
    """fp32 rows `(n, heads, dim)` -> (the dtype actually stored, arrays to store under that name)."""
    if storage == "int8":
        scale = np.maximum(np.abs(rows).max(axis=-1, keepdims=True), 1e-30) / 127.0
        scale16 = scale.astype(np.float16)
        safe = np.maximum(scale16.astype(np.float32), np.float32(1e-30))
        quantized = np.clip(np.rint(rows / safe), -127, 127).astype(np.int8)
        return "int8", {"": quantized, ".scale": scale16}
    if storage == "float16":
        encoded = _to_fp16(rows)
        if encoded is not None:
            return "float16", {"": encoded}
    return "bfloat16", {"": _to_bfloat16_bits(rows)}


def _to_fp16(rows: np.ndarray) -> np.ndarray | None:
    """fp32 -> fp16, or None when a value is not finite or beyond fp16's range."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    library = _library()
    if library is None:
        if not (np.isfinite(rows).all() and np.abs(rows).max(initial=0.0) <= _FP16_MAX):
            return None
        return rows.astype(np.float16)
    out = np.empty(rows.shape, np.uint16)
    if not library.node_kv_to_fp16(rows.ctypes.data, out.ctypes.data, rows.size):
        return None
    return out.view(np.float16)


def _to_bfloat16_bits(rows: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns (round to nearest even), as uint16."""
    bits = np.ascontiguousarray(rows, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))
    return (rounded >> 16).astype(np.uint16)


@functools.cache
def _library() -> ctypes.CDLL | None:
    library = native.load(_SOURCE)
    if library is not None:
        rows = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long]
        library.node_kv_fp16_rows.argtypes = rows
        library.node_kv_bf16_rows.argtypes = rows
        library.node_kv_int8_rows.argtypes = [ctypes.c_void_p, ctypes.c_long, *rows]
        library.node_kv_to_fp16.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
        library.node_kv_to_fp16.restype = ctypes.c_int
    return library


def decode_into(out: np.ndarray, stored: str, arrays: dict[str, np.ndarray]) -> None:
    """Write the decoded fp32 rows `(tokens, heads, dim)` into `out` (which may be strided)."""
    data = arrays[""]
    library = _library()
    if library is None or not _native_decode(library, out, stored, data, arrays.get(".scale")):
        _numpy_decode(out, stored, data, arrays.get(".scale"))


def _native_decode(library, out: np.ndarray, stored: str, data: np.ndarray, scale) -> bool:
    for head in range(data.shape[1]):
        src, dst = data[:, head], out[:, head]
        if src.strides[1] != src.itemsize or dst.strides[1] != 4:
            return False
        args = (src.ctypes.data, src.strides[0] // src.itemsize)
        target = (dst.ctypes.data, dst.strides[0] // 4, src.shape[0], src.shape[1])
        if stored == "float16":
            library.node_kv_fp16_rows(*args, *target)
        elif stored == "bfloat16":
            library.node_kv_bf16_rows(*args, *target)
        elif stored == "int8":
            scales = scale[:, head]
            library.node_kv_int8_rows(*args, scales.ctypes.data, scales.strides[0] // 2, *target)
        else:
            raise ValueError(f"unknown storage dtype {stored!r}")
    return True


def _numpy_decode(out: np.ndarray, stored: str, data: np.ndarray, scale) -> None:
    if stored == "float16":
        out[...] = data
    elif stored == "bfloat16":
        out.view(np.uint32)[...] = data.astype(np.uint32) << 16
    elif stored == "int8":
        np.multiply(data, scale, out=out, dtype=np.float32)
    else:
        raise ValueError(f"unknown storage dtype {stored!r}")

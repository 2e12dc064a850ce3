"""On-disk layout of agent memory: content-addressed KV blocks plus one small manifest per context.

    <root>/blocks/<key[:2]>/<key>.safetensors
        one block: the token ids of up to BLOCK_TOKENS consecutive positions and every layer's
        K/V for them, token-major `(tokens, kv_heads, head_dim)`, in the storage dtype.
        `key` = blake2b(model fingerprint, parent block's key, storage, token ids): a block names
        its whole prefix, so identical prefixes are one block on disk, whoever wrote them, and a
        block is written once, never changed (an existing file with that key is reused).
        Its safetensors metadata holds the key, the parent key, the storage and an xxh3-128 digest
        of each tensor; every read checks the digests of what it reads.
    <root>/contexts/<agent_ids.agent_dirname(id)>.json
        a context (an agent's history): the model fingerprint, the block keys of its path from
        position 0 (each with its start and length), token count, metadata, last use, whether it
        is pinned. Written whole to a unique temporary name, fsynced, renamed over: a context is
        always exactly one complete version.
    <root>/quarantine/...     contexts and blocks that failed verification, kept for inspection
    <root>/.lock              held by the one process that serves this cache (others: read-only)

A block is referenced by every context whose path contains it; it is deleted once none does.
Storage: fp16 (default: 18.4 KB/token for Gemma 3 270M), bf16, or int8 (per position and head,
absmax-scaled, fp16 scales: 9.3 KB/token). An fp16 block whose values overflow fp16 is stored bf16.
"""

from __future__ import annotations

import hashlib

import numpy as np
import xxhash

FORMAT_VERSION = 2
BLOCK_TOKENS = 256
STORAGES = ("float16", "bfloat16", "int8")
DEFAULT_STORAGE = "float16"
_FP16_MAX = 65504.0


def block_key(fingerprint: str, parent: str | None, storage: str, tokens: np.ndarray) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for part in (fingerprint, parent or "", storage):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(np.ascontiguousarray(tokens, dtype=np.int32).tobytes())
    return digest.hexdigest()


def tensor_digest(array: np.ndarray) -> str:
    return xxhash.xxh3_128_hexdigest(np.ascontiguousarray(array).data)


def encode(rows: np.ndarray, storage: str) -> tuple[str, dict[str, np.ndarray]]:
    """fp32 rows `(n, heads, dim)` -> (the dtype actually stored, arrays to store under that name)."""
    if storage == "int8":
        scale = np.maximum(np.abs(rows).max(axis=-1, keepdims=True), 1e-30) / 127.0
        scale16 = scale.astype(np.float16)
        safe = np.maximum(scale16.astype(np.float32), np.float32(1e-30))
        quantized = np.clip(np.rint(rows / safe), -127, 127).astype(np.int8)
        return "int8", {"": quantized, ".scale": scale16}
    if storage == "float16" and np.isfinite(rows).all() and np.abs(rows).max(initial=0.0) <= _FP16_MAX:
        return "float16", {"": rows.astype(np.float16)}
    return "bfloat16", {"": _to_bfloat16_bits(rows)}


def decode_into(out: np.ndarray, stored: str, arrays: dict[str, np.ndarray]) -> None:
    """Write decoded fp32 rows into `out` (one pass, no intermediate copy where avoidable)."""
    data = arrays[""]
    if stored == "float16":
        out[...] = data
    elif stored == "bfloat16":
        out.view(np.uint32)[...] = data.astype(np.uint32) << 16
    elif stored == "int8":
        np.multiply(data, arrays[".scale"], out=out, dtype=np.float32)
    else:
        raise ValueError(f"unknown storage dtype {stored!r}")


def _to_bfloat16_bits(rows: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns (round to nearest even), as uint16."""
    bits = np.ascontiguousarray(rows, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))
    return (rounded >> 16).astype(np.uint16)

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
Storage (`kv_codec`): fp16 (default: 18.4 KB/token for Gemma 3 270M), bf16, or int8 (per position
and head, absmax-scaled, fp16 scales: 9.3 KB/token). An fp16 block whose values overflow fp16 is
stored bf16.
"""

from __future__ import annotations

import hashlib

import numpy as np
import xxhash

FORMAT_VERSION = 2
BLOCK_TOKENS = 256
STORAGES = ("float16", "bfloat16", "int8")
DEFAULT_STORAGE = "float16"


def block_key(fingerprint: str, parent: str | None, storage: str, tokens: np.ndarray) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for part in (fingerprint, parent or "", storage):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(np.ascontiguousarray(tokens, dtype=np.int32).tobytes())
    return digest.hexdigest()


def is_block_key(value: object) -> bool:
    """A block key as `block_key` makes them (32 lowercase hex digits): safe as a file name."""
    return isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value)


def tensor_digest(array: np.ndarray) -> str:
    return xxhash.xxh3_128_hexdigest(np.ascontiguousarray(array).data)

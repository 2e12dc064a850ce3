"""On-disk layout of one agent's checkpoint: a JSON manifest plus append-only safetensors segments.

    <root>/agents/<readable-id>-<sha256(id)[:16]>/
        manifest.json            written last, by atomic rename: the checkpoint is what it lists
        seg-<n>.safetensors      token ids and every layer's K/V for positions [start, start + n)
    <root>/quarantine/...        checkpoints that failed verification, kept for inspection

K/V tensors are stored token-major, `(tokens, kv_heads, head_dim)`, so a range of positions is a
contiguous byte range that safetensors' mmap-backed `get_slice` reads without touching the rest.
Each tensor is digested (xxh3-128) per block of `BLOCK` tokens; a restore verifies exactly the
blocks it reads.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import xxhash

from node.errors import InvalidAgentId

FORMAT_VERSION = 1
BLOCK = 256
MANIFEST = "manifest.json"
AGENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")

# numpy has no bfloat16: such tensors travel as their raw 16-bit patterns.
STORAGE_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}


def validate_agent_id(agent_id: str) -> str:
    if not isinstance(agent_id, str) or not AGENT_ID.match(agent_id) or ".." in agent_id:
        raise InvalidAgentId(
            f"invalid agent id {agent_id!r}: use 1-128 characters from A-Z a-z 0-9 . _ : - "
            "starting with a letter or digit, without '..'"
        )
    return agent_id


def agent_dirname(agent_id: str) -> str:
    """A folder name that is safe everywhere and unique even where the filesystem folds case."""
    readable = re.sub(r"[^a-z0-9_-]", "_", agent_id.lower())[:48]
    return f"{readable}-{hashlib.sha256(agent_id.encode()).hexdigest()[:16]}"


def block_digests(array: np.ndarray) -> list[str]:
    return [
        xxhash.xxh3_128_hexdigest(np.ascontiguousarray(array[i : i + BLOCK]).data)
        for i in range(0, max(len(array), 1), BLOCK)
    ]


def tensor_names(layers: int) -> list[str]:
    return ["tokens"] + [f"{kind}.{i}" for i in range(layers) for kind in ("k", "v")]

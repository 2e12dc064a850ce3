"""On-disk layout of one agent's checkpoint: a JSON manifest plus append-only safetensors segments.

    <root>/agents/<agent_ids.agent_dirname(id)>/
        manifest.json            written last, by atomic rename: the checkpoint is what it lists
        seg-<n>.safetensors      token ids and every layer's K/V for positions [start, start + n)
    <root>/quarantine/...        checkpoints that failed verification, kept for inspection

K/V tensors are stored token-major, `(tokens, kv_heads, head_dim)`, so a range of positions is a
contiguous byte range that safetensors' mmap-backed `get_slice` reads without touching the rest.
Each tensor is digested (xxh3-128) per block of `BLOCK` tokens; a restore verifies exactly the
blocks it reads.
"""

from __future__ import annotations

import numpy as np
import xxhash

FORMAT_VERSION = 1
BLOCK = 256
MANIFEST = "manifest.json"


def block_digests(array: np.ndarray) -> list[str]:
    return [
        xxhash.xxh3_128_hexdigest(np.ascontiguousarray(array[i : i + BLOCK]).data)
        for i in range(0, max(len(array), 1), BLOCK)
    ]

"""Content-addressed KV block files (layout in `checkpoint_format`): write once, read verified.

Blocks are written with safetensors and read through `mmap` with a small header parser, so a
restore decodes each row it needs straight from the page cache into the caches' final layout: no
intermediate copy, and only the tensors (layers) and rows a restore needs are touched.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import numpy as np
from safetensors.numpy import save_file

from node.durable import fsync_path
from node.errors import CheckpointCorrupt
from node.memory.checkpoint_format import tensor_digest
from node.memory.kv_codec import decode_into, encode


def _corrupt(key: str, message: str) -> CheckpointCorrupt:
    error = CheckpointCorrupt(message)
    error.block_key = key
    return error


_NUMPY_DTYPES = {"F16": np.float16, "U16": np.uint16, "I8": np.int8, "I32": np.int32, "F32": np.float32}


def temporary_name(name: str) -> str:
    """A temporary file name no other process or thread will pick."""
    return f".{name}.{os.getpid()}.{time.time_ns()}.tmp"


class BlockFile:
    """One block opened for reading (mmap-backed); tensors are verified on first access."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = path, key
        try:
            with path.open("rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            (size,) = struct.unpack("<Q", self._map[:8])
            header = json.loads(bytes(self._map[8 : 8 + size]))
            self._offset = 8 + size
            self.meta = json.loads(header.pop("__metadata__")["node"])
            self._entries = header
        except (OSError, ValueError, KeyError, struct.error) as e:
            raise _corrupt(key, f"block {key} is unreadable: {e}") from e
        if self.meta.get("key") != key:
            raise _corrupt(key, f"block file {path.name} holds block {self.meta.get('key')!r}")
        self._verified: dict[str, np.ndarray] = {}

    def close(self) -> None:
        self._verified.clear()
        try:
            self._map.close()
        except BufferError:  # a caller still holds a view; the map closes when it is released
            pass

    @property
    def length(self) -> int:
        return int(self.meta["length"])

    def tensor(self, name: str) -> np.ndarray:
        found = self._verified.get(name)
        if found is not None:
            return found
        entry = self._entries.get(name)
        if entry is None:
            raise _corrupt(self.key, f"block {self.key} has no tensor {name}")
        start, stop = entry["data_offsets"]
        try:
            dtype = np.dtype(_NUMPY_DTYPES[entry["dtype"]])
            count = (stop - start) // dtype.itemsize
            array = np.frombuffer(self._map, dtype, count, self._offset + start).reshape(entry["shape"])
        except (KeyError, ValueError, TypeError) as e:
            raise _corrupt(self.key, f"block {self.key} tensor {name} is unreadable: {e}") from e
        if tensor_digest(array) != self.meta["digests"].get(name):
            raise _corrupt(self.key, f"block {self.key} tensor {name} fails its digest")
        self._verified[name] = array
        return array

    def tokens(self) -> np.ndarray:
        return np.array(self.tensor("tokens"), dtype=np.int64)

    def decode_rows(self, name: str, lo: int, hi: int, out: np.ndarray) -> None:
        """Rows [lo, hi) of K/V tensor `name` ("k.3") decoded to fp32 into `out` (hi - lo rows)."""
        stored = self.meta["dtypes"][name]
        arrays = {"": self.tensor(name)[lo:hi]}
        if stored == "int8":
            arrays[".scale"] = self.tensor(f"{name}.scale")[lo:hi]
        decode_into(out, stored, arrays)

    def raw_rows(self, name: str, lo: int, hi: int) -> np.ndarray:
        """fp32 rows of tensor `name` (for rewriting a block's prefix into a new block)."""
        first = self.tensor(name)
        out = np.empty((hi - lo, *first.shape[1:]), np.float32)
        self.decode_rows(name, lo, hi, out)
        return out


class BlockStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "blocks"

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def open(self, key: str) -> BlockFile:
        path = self.path(key)
        if not path.exists():
            raise _corrupt(key, f"block {key} is missing")
        return BlockFile(path, key)

    def write(
        self,
        key: str,
        parent: str | None,
        storage: str,
        tokens: np.ndarray,
        layers: list[tuple[np.ndarray, np.ndarray]],
    ) -> int:
        """Store a block unless one with this key exists; returns the bytes written (0: reused)."""
        target = self.path(key)
        if target.exists():
            return 0
        tensors: dict[str, np.ndarray] = {"tokens": np.ascontiguousarray(tokens, dtype=np.int32)}
        dtypes: dict[str, str] = {}
        for i, (keys, values) in enumerate(layers):
            for kind, rows in (("k", keys), ("v", values)):
                name = f"{kind}.{i}"
                dtypes[name], arrays = encode(rows, storage)
                for suffix, array in arrays.items():
                    tensors[name + suffix] = np.ascontiguousarray(array)
        meta = {
            "key": key,
            "parent": parent,
            "storage": storage,
            "length": len(tokens),
            "dtypes": dtypes,
            "digests": {name: tensor_digest(array) for name, array in tensors.items()},
        }
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.parent / temporary_name(target.name)
        try:
            try:
                save_file(tensors, str(temporary), metadata={"node": json.dumps(meta)})
            except Exception as e:  # safetensors wraps I/O errors (a full disk) in its own type
                raise OSError(f"cannot write block {key}: {e}") from e
            with temporary.open("rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
        fsync_path(target.parent)
        return target.stat().st_size

    def delete(self, key: str) -> int:
        path = self.path(key)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def stored(self) -> Iterator[tuple[str, int]]:
        """(key, bytes) of every stored block."""
        if not self.root.exists():
            return
        for path in self.root.glob("*/*.safetensors"):
            yield path.name.removesuffix(".safetensors"), path.stat().st_size

    def remove_temporaries(self) -> int:
        """Delete temporary files of interrupted writes (only while holding the cache lock)."""
        removed = 0
        for path in self.root.glob("*/.*.tmp") if self.root.exists() else ():
            path.unlink(missing_ok=True)
            removed += 1
        return removed


class OpenBlocks:
    """Blocks opened once for the duration of one restore or save."""

    def __init__(self, store: BlockStore) -> None:
        self.store = store
        self._files: dict[str, BlockFile] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        for block in self._files.values():
            block.close()
        self._files.clear()

    def __getitem__(self, key: str) -> BlockFile:
        block = self._files.get(key)
        if block is None:
            block = self._files[key] = self.store.open(key)
        return block

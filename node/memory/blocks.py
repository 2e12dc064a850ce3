"""Content-addressed KV block files (layout in `checkpoint_format`): write once, read verified.

Blocks are written with safetensors and read with `pread` and a small header parser: a restore
reads only the tensors (layers) it needs into one reused buffer, checks their digests and decodes
them straight into the caches' final layout.
"""

from __future__ import annotations

import json
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


class Scratch:
    """A reusable read buffer: reading tensors into it touches no fresh memory (page faults on new
    allocations and on mmapped files cost more than the copy from the page cache itself)."""

    def __init__(self) -> None:
        self._buffer = bytearray(0)

    def get(self, nbytes: int) -> memoryview:
        if len(self._buffer) < nbytes:
            self._buffer = bytearray(max(nbytes, 2 * len(self._buffer)))
        return memoryview(self._buffer)[:nbytes]


class BlockFile:
    """One block opened for reading; every tensor read is checked against its digest.

    `tensor` reads into `scratch` when given (the array is valid until the next read), else into
    new memory.
    """

    def __init__(self, path: Path, key: str, scratch: Scratch | None = None) -> None:
        self.path, self.key, self._scratch = path, key, scratch
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise _corrupt(key, f"block {key} is unreadable: {e}") from e
        try:
            (size,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            header = json.loads(os.pread(self._fd, size, 8))
            self._offset = 8 + size
            self.meta = json.loads(header.pop("__metadata__")["node"])
            self._entries = header
        except (OSError, ValueError, KeyError, struct.error) as e:
            os.close(self._fd)
            raise _corrupt(key, f"block {key} is unreadable: {e}") from e
        if self.meta.get("key") != key:
            os.close(self._fd)
            raise _corrupt(key, f"block file {path.name} holds block {self.meta.get('key')!r}")

    def close(self) -> None:
        os.close(self._fd)

    @property
    def length(self) -> int:
        return int(self.meta["length"])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def _entry(self, name: str) -> dict:
        entry = self._entries.get(name)
        if entry is None:
            raise _corrupt(self.key, f"block {self.key} has no tensor {name}")
        return entry

    def tensor(self, name: str, *, fresh: bool = False) -> np.ndarray:
        entry = self._entry(name)
        start, stop = entry["data_offsets"]
        nbytes = stop - start
        buffer = (
            memoryview(bytearray(nbytes)) if fresh or self._scratch is None else self._scratch.get(nbytes)
        )
        try:
            read = os.preadv(self._fd, [buffer], self._offset + start)
            dtype = np.dtype(_NUMPY_DTYPES[entry["dtype"]])
            if read != nbytes:
                raise ValueError(f"{read} of {nbytes} bytes")
            array = np.frombuffer(buffer, dtype).reshape(entry["shape"])
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise _corrupt(self.key, f"block {self.key} tensor {name} is unreadable: {e}") from e
        if tensor_digest(array) != self.meta["digests"].get(name):
            raise _corrupt(self.key, f"block {self.key} tensor {name} fails its digest")
        return array

    def tokens(self) -> np.ndarray:
        return np.array(self.tensor("tokens", fresh=True), dtype=np.int64)

    def verify(self) -> None:
        for name in self.meta["digests"]:
            self.tensor(name)

    def decode_rows(self, name: str, lo: int, hi: int, out: np.ndarray) -> None:
        """Rows [lo, hi) of K/V tensor `name` ("k.3") decoded to fp32 into `out` (hi - lo rows)."""
        stored = self.meta["dtypes"][name]
        arrays = {"": self.tensor(name)[lo:hi]}
        if stored == "int8":
            arrays[".scale"] = self.tensor(f"{name}.scale", fresh=True)[lo:hi]
        decode_into(out, stored, arrays)

    def raw_rows(self, name: str, lo: int, hi: int) -> np.ndarray:
        """fp32 rows of tensor `name` (for rewriting a block's prefix into a new block)."""
        out = np.empty((hi - lo, *self.shape(name)[1:]), np.float32)
        self.decode_rows(name, lo, hi, out)
        return out


class BlockStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "blocks"

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def open(self, key: str, scratch: Scratch | None = None) -> BlockFile:
        path = self.path(key)
        if not path.exists():
            raise _corrupt(key, f"block {key} is missing")
        return BlockFile(path, key, scratch)

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
        self.scratch = Scratch()
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
            block = self._files[key] = self.store.open(key, self.scratch)
        return block

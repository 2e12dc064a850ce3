"""Content-addressed KV block files (layout in `checkpoint_format`): write once, read verified.

Blocks are safetensors files, read with `pread` and a small header parser: a restore reads only the
tensors (layers) it needs into one reused buffer, checks their digests and decodes them straight
into the caches' final layout.

A block's tensors are laid out in the order a restore needs them: the token ids, then the layers
that keep their whole history (a model's global-attention layers), then the sliding-window layers,
which a restore reads only from the blocks holding their window. So the first `head_bytes` of a
block are all that a context's older blocks must provide, and a node pulling a context from the
shared store (`node.memory.sync`) fetches that much of them first, as a *partial* block file
(`<key>.safetensors.partial`), and the rest in the background. A read that needs more of a partial
block than it holds waits for the rest (`BlockStore.complete`). Partial blocks survive a restart
(the tier completes them then); they count as stored blocks. Blocks a pull brought are held in
memory first (`BlockStore.hold`: read from there at once, the digests checked on arrival) and
written to their files behind the restore (`land`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

import numpy as np

from node.durable import fsync_path, publish
from node.errors import BlockStoreUnavailable, CheckpointCorrupt
from node.memory.checkpoint_format import tensor_digest
from node.memory.kv_codec import decode_into, encode


def _corrupt(key: str, message: str) -> CheckpointCorrupt:
    error = CheckpointCorrupt(message)
    error.block_key = key
    return error


_NUMPY_DTYPES = {"F16": np.float16, "U16": np.uint16, "I8": np.int8, "I32": np.int32, "F32": np.float32}
_SAFETENSORS_DTYPES = {np.dtype(v): k for k, v in _NUMPY_DTYPES.items()}


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

    def __init__(
        self,
        path: Path | None,
        key: str,
        scratch: Scratch | None = None,
        complete=None,
        data: list | None = None,
    ) -> None:
        """`complete` (for a partial block): called when a read needs bytes past its end; returns
        the path of the whole block once it is there. `data`: the block's bytes in memory (a pull
        that has not written its file yet: a list of buffers one after the other, such as a head
        and its rest) instead of the file at `path`."""
        self.key, self._scratch, self._complete = key, scratch, complete
        self._fd: int | None = None
        self._checked: set[str] = set()  # tensors of a block in memory whose digests matched
        if data is None:
            self._open(path)
        else:
            self.path, self._parts = None, [memoryview(part).cast("B") for part in data]
            self._size = sum(len(part) for part in self._parts)
        try:
            (size,) = struct.unpack("<Q", self._read_bytes(0, 8))
            header = json.loads(self._read_bytes(8, size))
            self._offset = 8 + size
            self.meta = json.loads(header.pop("__metadata__")["node"])
            self._entries = header
        except (OSError, ValueError, KeyError, struct.error) as e:
            self.close()
            raise _corrupt(key, f"block {key} is unreadable: {e}") from e
        if self.meta.get("key") != key:
            self.close()
            raise _corrupt(key, f"block file {path and path.name} holds block {self.meta.get('key')!r}")

    def reader(self, scratch: Scratch | None = None, complete=None) -> BlockFile:
        """Another reader of this block in memory, sharing its parsed header and its checks."""
        if self._fd is not None:
            raise ValueError("only a block in memory is shared between readers")
        other = copy.copy(self)
        other._scratch, other._complete = scratch, complete
        return other

    @property
    def buffers(self) -> list[memoryview]:
        """The bytes of a block in memory, in order (one buffer, or a head and its rest)."""
        return self._parts

    def _in_memory(self, start: int, stop: int) -> memoryview:
        """Bytes [start, stop) of a block in memory, in place (a tensor lies within one part)."""
        base = 0
        for part in self._parts:
            if start < base + len(part):
                return part[start - base : stop - base]
            base += len(part)
        return memoryview(b"")

    def _read_bytes(self, offset: int, nbytes: int) -> bytes:
        if self._fd is None:
            return bytes(self._in_memory(offset, offset + nbytes))
        return os.pread(self._fd, nbytes, offset)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

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

    def head_bytes(self) -> int | None:
        """Bytes from the file's start through the token ids and the whole-history layers' tensors
        (None: a block written before the layout put them first)."""
        history = self.meta.get("history_layers")
        if history is None:
            return None
        names = ["tokens"] + [f"{kind}.{i}" for i in history for kind in ("k", "v")]
        names += [n + ".scale" for n in names if n + ".scale" in self._entries]
        return self._offset + max(self._entry(n)["data_offsets"][1] for n in names)

    def held_bytes(self) -> int:
        """Bytes this file (or buffer) holds: fewer than `whole_bytes` for a partial block."""
        return self._size

    def whole_bytes(self) -> int:
        """The whole block's size (a partial block's file holds fewer)."""
        return self._offset + max((e["data_offsets"][1] for e in self._entries.values()), default=0)

    def present(self) -> list[str]:
        """The tensors this file holds whole (all of them unless it is a partial block)."""
        return [n for n, e in self._entries.items() if self._offset + e["data_offsets"][1] <= self._size]

    def _open(self, path: Path) -> None:
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise _corrupt(self.key, f"block {self.key} is unreadable: {e}") from e
        self.path, self._parts, self._size = path, [], os.fstat(self._fd).st_size
        self._checked = set()  # a file is checked on every read

    def _ensure_whole(self, stop: int) -> None:
        if self._offset + stop <= self._size or self._complete is None:
            return
        path = self._complete(self.key)
        self.close()
        self._complete = None
        self._open(path)

    def tensor(self, name: str, *, fresh: bool = False) -> np.ndarray:
        entry = self._entry(name)
        start, stop = entry["data_offsets"]
        self._ensure_whole(stop)
        nbytes = stop - start
        try:
            if self._fd is None:  # in memory: read in place
                buffer = self._in_memory(self._offset + start, self._offset + stop)
                read = len(buffer)
                if fresh:
                    buffer = memoryview(bytearray(buffer))
            else:
                buffer = self._scratch.get(nbytes) if self._scratch is not None and not fresh else None
                buffer = memoryview(bytearray(nbytes)) if buffer is None else buffer
                read = os.preadv(self._fd, [buffer], self._offset + start)
            dtype = np.dtype(_NUMPY_DTYPES[entry["dtype"]])
            if read != nbytes:
                raise ValueError(f"{read} of {nbytes} bytes")
            array = np.frombuffer(buffer, dtype).reshape(entry["shape"])
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise _corrupt(self.key, f"block {self.key} tensor {name} is unreadable: {e}") from e
        if name in self._checked:  # in memory, unchanged since (a file may change under us)
            return array
        if tensor_digest(array) != self.meta["digests"].get(name):
            raise _corrupt(self.key, f"block {self.key} tensor {name} fails its digest")
        if self._fd is None:
            self._checked.add(name)
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
        # Set by the shared store's tier: brings a partial block's rest, returns the whole block's
        # path (raises CheckpointError when it cannot).
        self.complete: Callable[[str], Path] | None = None
        # Blocks a pull brought into memory whose files are not written yet (`hold`, `land`):
        # key -> (block, partial). They read like files; nothing on disk names them until landed.
        self._held: dict[str, tuple[BlockFile, bool]] = {}
        self._landing = threading.Lock()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def partial_path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors.partial"

    def exists(self, key: str) -> bool:
        held = self._held.get(key)
        return (held is not None and not held[1]) or self.path(key).exists()

    def held(self, key: str) -> bool:
        """Whole, or in part with its rest on the way (on disk or still in memory)."""
        return key in self._held or self.path(key).exists() or self.partial_path(key).exists()

    def size(self, key: str) -> int:
        held = self._held.get(key)
        if held is not None:
            return held[0].held_bytes()
        for path in (self.path(key), self.partial_path(key)):
            with contextlib.suppress(FileNotFoundError):
                return path.stat().st_size
        return 0

    def whole_path(self, key: str) -> Path:
        """The whole block's file, its rest fetched first if it is partial (for readers that
        read files by path)."""
        self.land(key)
        path = self.path(key)
        if not path.exists() and self.partial_path(key).exists():
            return self._rest(key)
        return path

    def open(self, key: str, scratch: Scratch | None = None) -> BlockFile:
        held = self._held.get(key)
        if held is not None:
            block, partial = held
            return block.reader(scratch, self._rest if partial else None)
        path = self.path(key)
        if path.exists():
            return BlockFile(path, key, scratch)
        partial = self.partial_path(key)
        if partial.exists():
            return BlockFile(partial, key, scratch, self._rest)
        raise _corrupt(key, f"block {key} is missing")

    def _rest(self, key: str) -> Path:
        if self.complete is None:
            raise BlockStoreUnavailable(
                f"block {key} is partial here and its rest is in the shared block store: serve with "
                "--block-store to read it"
            )
        self.land(key)
        return self.complete(key)

    def head(self, key: str, nbytes: int) -> bytes:
        """A block's first `nbytes` (its head), from memory or its file, whole or partial."""
        held = self._held.get(key)
        if held is not None:
            return bytes(held[0].buffers[0][:nbytes])
        for path in (self.path(key), self.partial_path(key)):
            with contextlib.suppress(FileNotFoundError), path.open("rb") as handle:
                data = handle.read(nbytes)
                if len(data) == nbytes:
                    return data
        raise FileNotFoundError(f"block {key} holds no {nbytes}-byte head here")

    def hold(self, key: str, block: BlockFile, partial: bool) -> None:
        """A block (or its head: `partial`) checked in memory, readable at once; `land` writes it."""
        if not self.held(key):
            self._held[key] = (block, partial)

    def land(self, key: str) -> None:
        """Write a block held in memory to its file (fsynced, renamed into place), then drop it
        from memory; nothing to do for a block on disk."""
        if key not in self._held:
            return
        with self._landing:
            held = self._held.get(key)
            if held is None:
                return
            block, partial = held
            target = self.partial_path(key) if partial else self.path(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            publish(target, block.buffers, target.parent / temporary_name(target.name))
            self._held.pop(key, None)

    def partial_keys(self) -> list[str]:
        return [
            p.name.removesuffix(".safetensors.partial") for p in self.root.glob("*/*.safetensors.partial")
        ]

    def write(
        self,
        key: str,
        parent: str | None,
        storage: str,
        tokens: np.ndarray,
        layers: list[tuple[np.ndarray, np.ndarray]],
        history_layers: tuple[int, ...] = (),
    ) -> int:
        """Store a block unless one with this key exists; returns the bytes written (0: reused).
        `history_layers`: the layers whose caches keep their whole history, stored first."""
        target = self.path(key)
        if target.exists():
            return 0
        tensors: dict[str, np.ndarray] = {"tokens": np.ascontiguousarray(tokens, dtype=np.int32)}
        dtypes: dict[str, str] = {}
        order = [*history_layers, *(i for i in range(len(layers)) if i not in history_layers)]
        for i in order:
            keys, values = layers[i]
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
            "history_layers": sorted(history_layers),
            "digests": {name: tensor_digest(array) for name, array in tensors.items()},
        }
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.parent / temporary_name(target.name)
        try:
            _save_in_order(tensors, temporary, {"node": json.dumps(meta)})
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
        fsync_path(target.parent)
        return target.stat().st_size

    def delete(self, key: str) -> int:
        with self._landing:  # not while it is being written
            held = self._held.pop(key, None)
        size = 0 if held is None else held[0].held_bytes()
        for path in (self.path(key), self.partial_path(key)):
            try:
                size += path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                pass
        return size

    def stored(self) -> Iterator[tuple[str, int]]:
        """(key, bytes) of every stored block, whole or partial."""
        if not self.root.exists():
            return
        for pattern in ("*/*.safetensors.partial", "*/*.safetensors"):
            for path in self.root.glob(pattern):
                with contextlib.suppress(FileNotFoundError):  # completed or deleted meanwhile
                    yield path.name.split(".", 1)[0], path.stat().st_size

    def remove_temporaries(self) -> int:
        """Delete temporary files of interrupted writes (only while holding the cache lock).
        Partial blocks stay: the shared store's tier completes them."""
        removed = 0
        for path in self.root.glob("*/.*.tmp") if self.root.exists() else ():
            path.unlink(missing_ok=True)
            removed += 1
        return removed


def _save_in_order(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file with the tensors in the dict's order (the format allows any order
    of data; the safetensors package sorts by dtype and name, which would scatter the layers a
    partial block must hold), fsynced."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, array in tensors.items():
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for array in tensors.values():
            handle.write(memoryview(np.ascontiguousarray(array)).cast("B"))
        handle.flush()
        os.fsync(handle.fileno())


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

"""A restore that runs near the storage's speed: parallel reads, straight into the model's arrays.

`CheckpointStore.restore` decodes every row it needs to fp32 on the host, one block and layer after
another, and hands MLX an fp32 cache. On a GPU whose model runs in bf16 that doubles the bytes moved,
gives the cache another dtype than the model's, and leaves the disk, the page cache and the PCIe
link mostly idle. This module restores the same contexts (format 2: content-addressed blocks,
layout in `checkpoint_format`) differently:

1. `plan_restore` reads the manifest and each block's safetensors header once and turns "layer i
   needs positions [history_start, stop)" into byte extents of whole tensors (a block's tensor is
   also its unit of verification: an xxh3-128 digest per tensor). Sliding-window layers read only
   the blocks that hold their window.
2. `load_planned` reads the extents with `os.preadv` on a thread pool (the GIL is released during
   the read and during xxhash), in the storage dtype (fp16, bf16, or int8 and its scales), into one
   host buffer per layer and tensor, rows in place: a block read whole lands where it belongs, with
   no intermediate copy.
3. Layers are handed to MLX in order as their reads complete: `mx.array` copies the buffer into the
   backend's memory; the dtype conversion (int8 x scale, fp16 -> the model's dtype) and the
   (tokens, heads, dim) -> (1, heads, tokens, dim) transpose run on the device; `mx.async_eval` lets
   the copy and conversion of layer i overlap the reads of the layers after it (AttentionStore's
   layer-wise preload, applied to the restore itself).

Nothing here needs a GPU: on the CPU backend it is a parallel restore (caches in `dtype`).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import json
import os
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from node.errors import CheckpointCorrupt, CheckpointError
from node.memory.checkpoint_format import tensor_digest
from node.memory.prefix_index import BlockRef

READ_THREADS = 16  # an H200 host's 16 cores; its disk gave as much to 16 readers as to 32 or 64
HEADER_THREADS = 8
_NUMPY = {"F16": np.float16, "U16": np.uint16, "I8": np.int8, "I32": np.int32, "F32": np.float32}
_STORED_AS = {"float16": mx.float16, "bfloat16": mx.bfloat16, "int8": mx.int8}


@dataclass(frozen=True)
class Read:
    """One whole tensor of one block file; rows [skip, skip + keep) of it are wanted."""

    path: str
    offset: int
    nbytes: int
    digest: str
    skip: int
    keep: int
    rows: int  # rows the tensor holds


@dataclass(frozen=True)
class TensorPlan:
    stored: str  # "float16" | "bfloat16" | "int8"
    first: int  # absolute position of the first row
    shape: tuple[int, int, int]  # (rows, heads, dim)
    reads: tuple[Read, ...]
    scales: tuple[Read, ...] = ()  # int8: per position and head, fp16

    @property
    def nbytes(self) -> int:
        width = 1 if self.stored == "int8" else 2
        rows, heads, dim = self.shape
        return rows * heads * (dim * width + (2 if self.stored == "int8" else 0))


@dataclass(frozen=True)
class RestorePlan:
    tokens: list[int]
    layers: list[tuple[TensorPlan, TensorPlan]]
    metadata: dict
    blocks: tuple[BlockRef, ...] = ()  # the stored path behind `tokens`

    @property
    def nbytes(self) -> int:
        """Bytes of K/V the caches receive (what a restore must read at least)."""
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


@dataclass
class Phases:
    """Where one restore's time went (seconds)."""

    plan_s: float = 0.0
    read_wait_s: float = 0.0  # the main thread waiting for reads it could not overlap
    total_s: float = 0.0
    bytes_read: int = 0
    extra: dict = field(default_factory=dict)


class _Block:
    """A block file's header: where each tensor lies, its stored dtype and digest, and its verified
    token ids."""

    def __init__(self, path: Path, key: str) -> None:
        try:
            with path.open("rb") as handle:
                (size,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(size))
        except (OSError, ValueError, struct.error) as e:
            raise CheckpointCorrupt(f"block {key} is unreadable: {e}") from e
        self.path, self.base = str(path), 8 + size
        self.meta = json.loads(header.pop("__metadata__")["node"])
        if self.meta.get("key") != key:
            raise CheckpointCorrupt(f"block file {path.name} holds block {self.meta.get('key')!r}")
        self.entries = header
        self.token_ids = self._tokens()

    def read(self, name: str, skip: int, keep: int) -> Read:
        entry = self.entries.get(name)
        if entry is None:
            raise CheckpointCorrupt(f"block {self.meta['key']} has no tensor {name}")
        start, stop = entry["data_offsets"]
        return Read(
            self.path,
            self.base + start,
            stop - start,
            self.meta["digests"][name],
            skip,
            keep,
            entry["shape"][0],
        )

    def _tokens(self) -> np.ndarray:
        entry = self.entries["tokens"]
        start, stop = entry["data_offsets"]
        with open(self.path, "rb") as handle:
            handle.seek(self.base + start)
            data = handle.read(stop - start)
        tokens = np.frombuffer(data, np.int32)
        if tensor_digest(tokens) != self.meta["digests"]["tokens"]:
            raise CheckpointCorrupt(f"block {self.meta['key']} tensor tokens fails its digest")
        return tokens


class _Headers:
    """Parsed block headers, kept while their file is unchanged (a block is content-addressed and
    written once, so its header is too): a restore of blocks read or written before skips reading
    and parsing them (~0.4 ms per block, 50 ms for a 32k-token context of 48 layers). Keyed by the
    file's identity (device, inode, size, mtime), so a block deleted and written again is read
    again; bounded, least recently used first out."""

    LIMIT = 2048  # a 12B model's 32k-token context is 128 blocks

    def __init__(self) -> None:
        self._parsed: dict[tuple, _Block] = {}
        self._lock = threading.Lock()

    def get_all(self, paths: list[tuple[Path, str]]) -> list[_Block]:
        """The blocks at `paths` ((path, key) pairs); those not parsed before are read in
        parallel (a cold disk answers several at once)."""
        identities = [self._identity(path, key) for path, key in paths]
        with self._lock:
            found = [self._parsed.pop(identity, None) for identity in identities]
        missing = [i for i, block in enumerate(found) if block is None]
        if missing:
            with ThreadPoolExecutor(max_workers=min(HEADER_THREADS, len(missing))) as pool:
                for i, block in zip(missing, pool.map(lambda i: _Block(*paths[i]), missing)):
                    found[i] = block
        with self._lock:
            for identity, block in zip(identities, found):
                self._parsed[identity] = block
            while len(self._parsed) > self.LIMIT:
                self._parsed.pop(next(iter(self._parsed)))
        return found

    @staticmethod
    def _identity(path: Path, key: str) -> tuple:
        try:
            st = os.stat(path)
        except OSError as e:
            raise CheckpointCorrupt(f"block {key} is unreadable: {e}") from e
        return (str(path), key, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def clear(self) -> None:
        with self._lock:
            self._parsed.clear()


HEADERS = _Headers()


def _tensor_plan(blocks: list[tuple[dict, _Block]], name: str, lo: int, hi: int) -> TensorPlan:
    reads, scales, stored, shape = [], [], None, None
    ends = [ref["start"] + ref["length"] for ref, _ in blocks]  # a path's blocks are in order
    for ref, block in blocks[bisect.bisect_right(ends, lo) :]:
        if ref["start"] >= hi:
            break
        a, b = max(lo, ref["start"]), min(hi, ref["start"] + ref["length"])
        stored = block.meta["dtypes"][name]
        shape = tuple(block.entries[name]["shape"][1:])
        reads.append(block.read(name, a - ref["start"], b - a))
        if stored == "int8":
            scales.append(block.read(f"{name}.scale", a - ref["start"], b - a))
    if sum(r.keep for r in reads) != hi - lo:
        raise CheckpointCorrupt(f"the stored path does not cover positions {lo}-{hi} of {name}")
    return TensorPlan(stored, lo, (hi - lo, *shape), tuple(reads), tuple(scales))


def plan_restore(store, agent_id: str, caches: list, position=None) -> RestorePlan:
    """What to read for `caches` (fresh, one per layer) at `position(saved_tokens)` tokens."""
    manifest = store.manifest(agent_id)
    if manifest is None:
        raise CheckpointError(f"agent {agent_id!r} has no checkpoint")
    if len(caches) != manifest["layers"]:
        raise CheckpointCorrupt(
            f"context of {agent_id!r} has {manifest['layers']} layers, model has {len(caches)}"
        )
    plan = plan_path(store, [BlockRef.from_dict(ref) for ref in manifest["blocks"]], caches, position)
    return dataclasses.replace(plan, metadata=manifest.get("metadata") or {})


def plan_path(store, path: list[BlockRef], caches: list, position=None) -> RestorePlan:
    """What to read for `caches` from a path of blocks (`CheckpointStore.restore_path`'s input)."""
    parsed = HEADERS.get_all([(store.blocks.whole_path(ref.key), ref.key) for ref in path])
    blocks = [(ref.as_dict(), block) for ref, block in zip(path, parsed)]
    tokens = [t for ref, block in blocks for t in block.token_ids[: ref["length"]].tolist()]
    stop = len(tokens) if position is None else min(position(tokens), len(tokens))
    layers = []
    for i, cache in enumerate(caches if stop else ()):
        first = cache.history_start(stop)
        layers.append(
            (_tensor_plan(blocks, f"k.{i}", first, stop), _tensor_plan(blocks, f"v.{i}", first, stop))
        )
    used = tuple(ref for ref in path if ref.start < stop)
    return RestorePlan(tokens[:stop], layers, {}, used)


def _read_into(read: Read, target: np.ndarray, verify: bool, fd: int) -> int:
    """Read one tensor; verify it; leave its rows [skip, skip + keep) in `target` (uint8 rows)."""
    whole = read.skip == 0 and read.keep == read.rows
    buffer = target.reshape(-1) if whole else np.empty(read.nbytes, np.uint8)
    view, done = memoryview(buffer), 0
    while done < read.nbytes:
        got = os.preadv(fd, [view[done:]], read.offset + done)
        if got <= 0:
            raise CheckpointCorrupt(f"{read.path} ends before byte {read.offset + done}")
        done += got
    if verify and tensor_digest(buffer) != read.digest:
        raise CheckpointCorrupt(f"{read.path}: a tensor at byte {read.offset} fails its digest")
    if not whole:
        rows = buffer.reshape(read.rows, -1)
        target[...] = rows[read.skip : read.skip + read.keep]
    return read.nbytes


class Slots:
    """Staging memory reused across restores: one slot per tensor of a restore (MLX sizes are
    int32), each grown on demand (the old one freed first), never shrunk; one restore at a time
    (restores run on the thread that owns MLX). `make(nbytes)` builds a slot: anything with an
    `nbytes`."""

    def __init__(self, make) -> None:
        self.make = make
        self.slots: list = []

    def take(self, slot: int, nbytes: int):
        while len(self.slots) <= slot:
            self.slots.append(None)
        if self.slots[slot] is None or self.slots[slot].nbytes < nbytes:
            self.slots[slot] = None
            self.slots[slot] = self.make(max(nbytes, 1))
        return self.slots[slot]


@dataclass(frozen=True)
class HostSlot:
    """Host memory owned by MLX: reads land in it through a numpy view and device kernels read it
    from there, so no host-side copy remains between the file and the GPU (on CUDA, MLX's
    host-visible memory)."""

    array: mx.array
    view: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.array.size

    @classmethod
    def make(cls, nbytes: int, prepare=None) -> HostSlot:
        array = mx.zeros((nbytes,), mx.uint8, stream=mx.cpu)
        mx.eval(array)
        if prepare is not None:
            prepare(array)
        return cls(array, np.array(array, copy=False))


@dataclass(frozen=True)
class PinnedSlot:
    """On CUDA: page-locked host memory the reads land in, and an MLX array resident on the GPU
    that one `cudaMemcpyAsync` fills (`cuda_transfer`)."""

    host: object  # cuda_transfer.PinnedBuffer
    array: mx.array
    pointer: int

    @property
    def nbytes(self) -> int:
        return self.host.nbytes

    @classmethod
    def make(cls, nbytes: int) -> PinnedSlot:
        from node.memory import cuda_transfer

        host = cuda_transfer.PinnedBuffer(nbytes)
        array, pointer = cuda_transfer.device_array(nbytes, copy_stream().handle)
        return cls(host, array, pointer)


@functools.cache
def copy_stream():
    from node.memory import cuda_transfer

    return cuda_transfer.CopyStream()


def _host_mapped(array: mx.array) -> None:
    from node.memory import cuda_transfer

    cuda_transfer.host_mapped(array)


STAGING = Slots(HostSlot.make)
MAPPED = Slots(functools.partial(HostSlot.make, prepare=_host_mapped))
PINNED = Slots(PinnedSlot.make)
LANDINGS = ("copy", "staging", "mapped", "pinned")


def best_landing() -> str:
    """Pinned copies where CUDA's runtime is reachable (measured fastest on an H200), else MLX's
    own host-visible staging."""
    from node.memory import cuda_transfer

    return "pinned" if cuda_transfer.available() else "staging"


class _Landing:
    """Where a restore's reads land: fresh numpy buffers ("copy": mx.array copies each), MLX's
    host-visible staging slots ("staging": device kernels read the reads in place; "mapped": the
    same slots advised to stay on the host and be read over the link), or page-locked host slots
    copied to GPU-resident slots ("pinned", CUDA only)."""

    def __init__(self, mode: str) -> None:
        if mode not in LANDINGS:
            raise ValueError(f"unknown landing {mode!r}: one of {', '.join(LANDINGS)}")
        self.mode, self.slot = mode, 0

    def buffer(self, rows: int, row_bytes: int) -> tuple[np.ndarray, object]:
        nbytes = rows * row_bytes
        if self.mode == "copy":
            return np.empty((rows, row_bytes), np.uint8), None
        slots = {"pinned": PINNED, "mapped": MAPPED, "staging": STAGING}[self.mode]
        slot = slots.take(self.slot, nbytes)
        self.slot += 1
        host = slot.host.view if self.mode == "pinned" else slot.view
        return host[:nbytes].reshape(rows, row_bytes), slot

    def device(self, host: np.ndarray, slot) -> mx.array:
        if slot is None:
            return mx.array(host)
        if self.mode == "pinned":
            copy_stream().copy(slot.pointer, slot.host.pointer, host.nbytes)
        return slot.array[: host.size].reshape(host.shape)

    def ready(self) -> None:
        """The copies issued so far have landed (device kernels may read them)."""
        if self.mode == "pinned":
            copy_stream().wait()


def _submit(pool, files, landing: _Landing, reads: tuple[Read, ...], rows: int, row_bytes: int, verify: bool):
    host, staged = landing.buffer(rows, row_bytes)
    futures, row = [], 0
    for read in reads:
        futures.append(pool.submit(_read_into, read, host[row : row + read.keep], verify, files[read.path]))
        row += read.keep
    return host, staged, futures


def _read_tensor(pool, files, landing: _Landing, plan: TensorPlan, verify: bool):
    rows, heads, dim = plan.shape
    width = 1 if plan.stored == "int8" else 2
    data = _submit(pool, files, landing, plan.reads, rows, heads * dim * width, verify)
    scales = _submit(pool, files, landing, plan.scales, rows, heads * 2, verify) if plan.scales else None
    return data, scales


def _to_device(
    plan: TensorPlan, data: mx.array, scales: mx.array | None, dtype: mx.Dtype, owned: bool
) -> mx.array:
    """Rows in the storage dtype -> a contiguous (1, heads, tokens, dim) `dtype` array in memory of
    its own (`owned`: `data` may be reused once this is evaluated, so it must be copied). The
    transpose goes first, so the conversion writes the final layout in one kernel and one
    allocation."""
    rows, heads, dim = plan.shape
    array = data.view(_STORED_AS[plan.stored]).reshape(rows, heads, dim).transpose(1, 0, 2)
    if scales is not None:
        scale = scales.view(mx.float16).reshape(rows, heads, 1).transpose(1, 0, 2)
        array = array.astype(dtype) * scale.astype(dtype)  # the product reuses the converted buffer
    elif array.dtype != dtype:
        array = array.astype(dtype)
    elif heads > 1 or not owned:
        array = mx.contiguous(array) if heads > 1 else array * mx.array(1, dtype)
    return array.reshape(1, heads, rows, dim)


def _device_tensor(landing: _Landing, plan: TensorPlan, io, dtype: mx.Dtype) -> mx.array:
    (host, staged, _), scales = io
    data = landing.device(host, staged)
    scale = landing.device(scales[0], scales[1]) if scales else None
    return _to_device(plan, data, scale, dtype, owned=landing.mode == "copy")


def _wait(io) -> int:
    (_, _, futures), scales = io
    return sum(f.result() for f in futures) + (sum(f.result() for f in scales[2]) if scales else 0)


@contextlib.contextmanager
def _open_all(plan: RestorePlan):
    """Each block file of `plan` opened once for all its reads (a 32k-token context of 48 layers
    makes ~2,400 reads of 128 files)."""
    files: dict[str, int] = {}
    try:
        for k, v in plan.layers:
            for read in (*k.reads, *k.scales, *v.reads, *v.scales):
                if read.path not in files:
                    files[read.path] = os.open(read.path, os.O_RDONLY)
        yield files
    except OSError as e:
        raise CheckpointCorrupt(f"a block file is unreadable: {e}") from e
    finally:
        for fd in files.values():
            os.close(fd)


def load_planned(
    plan: RestorePlan,
    caches: list,
    dtype: mx.Dtype,
    threads: int = READ_THREADS,
    verify: bool = True,
    landing: str = "copy",
) -> Phases:
    """Fill `caches` from `plan`. Each tensor is handed to the device as soon as its reads land
    (a pinned copy starts right away; the conversions are recorded), while later reads continue;
    the conversions then run as one evaluation: on an H200 an evaluation per layer cost more in
    dispatch than the conversions it ran (docs/benchmarks.md)."""
    phases = Phases()
    started = time.perf_counter()
    where = _Landing(landing)
    with _open_all(plan) as files, ThreadPoolExecutor(max_workers=threads) as pool:
        pending = [
            (_read_tensor(pool, files, where, k, verify), _read_tensor(pool, files, where, v, verify))
            for k, v in plan.layers
        ]
        arrays = []
        for cache, (k_plan, v_plan), (k_io, v_io) in zip(caches, plan.layers, pending):
            waited = time.perf_counter()
            phases.bytes_read += _wait(k_io) + _wait(v_io)
            phases.read_wait_s += time.perf_counter() - waited
            keys = _device_tensor(where, k_plan, k_io, dtype)
            values = _device_tensor(where, v_plan, v_io, dtype)
            cache.install(keys, values, k_plan.first)
            arrays += [keys, values]
    issued = time.perf_counter()
    where.ready()
    mx.eval(arrays)
    phases.extra["device_wait_s"] = time.perf_counter() - issued
    phases.total_s = time.perf_counter() - started
    return phases


def restore(
    store, agent_id: str, make_caches, dtype: mx.Dtype, position=None, **options
) -> DeviceRestored | None:
    """`CheckpointStore.restore`'s contract (same tokens, metadata, blocks, cache layout), caches
    in `dtype` (the model's), read in parallel; `options` as `_load` takes them."""
    return _load(
        lambda caches: plan_restore(store, agent_id, caches, position), make_caches, dtype, **options
    )


def restore_path(
    store, path: list[BlockRef], make_caches, dtype: mx.Dtype, position=None, **options
) -> DeviceRestored | None:
    """`CheckpointStore.restore_path`'s contract, read as `restore` reads."""
    return _load(lambda caches: plan_path(store, path, caches, position), make_caches, dtype, **options)


def _load(
    plan_for,
    make_caches,
    dtype: mx.Dtype,
    threads: int = READ_THREADS,
    verify: bool = True,
    landing: str = "copy",
    accept=None,
) -> DeviceRestored | None:
    """Plan, then read with `threads` readers (digests checked when `verify`) into `landing`'s
    memory. `accept(plan)` (optional) sees what would be read before anything is: when it says
    no, nothing is read and the answer is None."""
    started = time.perf_counter()
    caches = make_caches()
    plan = plan_for(caches)
    if accept is not None and not accept(plan):
        return None
    planned = time.perf_counter()
    phases = load_planned(plan, caches, dtype, threads, verify, landing)
    phases.plan_s = planned - started
    phases.total_s = time.perf_counter() - started
    return DeviceRestored(plan.tokens, caches, plan.metadata, phases.total_s, plan.blocks, phases)


@dataclass(frozen=True)
class DeviceRestored:
    """`checkpoint.Restored`'s fields, plus where the time went."""

    tokens: list[int]
    caches: list
    metadata: dict
    seconds: float
    blocks: tuple[BlockRef, ...]
    phases: Phases

"""Host-to-GPU copies at the PCIe link's speed, which MLX's Python API does not offer.

On CUDA, MLX keeps an array created or read on the host in managed memory and lets the GPU pull it
page by page on first use (~9 GB/s on an H200), and host writes into managed pages the GPU has
touched fault them back (2-6 GB/s). A restore moves gigabytes that way. This module takes the two
steps a CUDA program would:

- reads land in page-locked host memory (`cudaHostAlloc`), which the copy engine reads directly;
- `cudaMemcpyAsync` copies them into an MLX array whose managed pages are advised to live on the
  GPU and were prefetched there once, so the copy is one DMA and MLX's kernels then read device
  memory.

The CUDA runtime comes through NVIDIA's own bindings (`cuda-bindings`, the `cuda` extra), which
share the process's primary context with MLX. `available()` is False without them or without a
GPU; callers then keep MLX's own path.
"""

from __future__ import annotations

import ctypes
import functools

import mlx.core as mx
import numpy as np


@functools.cache
def _runtime():
    from cuda.bindings import runtime

    return runtime


@functools.cache
def available() -> bool:
    """cuda-bindings importable, MLX running on a CUDA GPU, and managed memory usable there."""
    try:
        if not (mx.cuda.is_available() and mx.default_device() == mx.gpu):
            return False
        rt = _runtime()
        device = _check(rt.cudaGetDevice(), "cudaGetDevice")
        managed = _check(
            rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrConcurrentManagedAccess, device),
            "cudaDeviceGetAttribute",
        )
        return bool(managed)
    except Exception:  # noqa: BLE001 - no bindings, no driver, no GPU: MLX's own path
        return False


def _check(result, what: str):
    error, *values = result
    if int(error) != 0:
        raise RuntimeError(f"{what} failed: {error}")
    return values[0] if len(values) == 1 else values


def _device_location():
    rt = _runtime()
    location = rt.cudaMemLocation()
    location.type = rt.cudaMemLocationType.cudaMemLocationTypeDevice
    location.id = _check(rt.cudaGetDevice(), "cudaGetDevice")
    return location


def address(array: mx.array) -> int:
    """Where an evaluated MLX array's data lies (MLX moves it to managed memory to say so)."""
    return np.array(array, copy=False).__array_interface__["data"][0]


class PinnedBuffer:
    """Page-locked host memory with a numpy view; freed with the object."""

    def __init__(self, nbytes: int) -> None:
        rt = _runtime()
        self.nbytes = nbytes
        self.pointer = _check(rt.cudaHostAlloc(nbytes, rt.cudaHostAllocDefault), "cudaHostAlloc")
        self.view = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(self.pointer))

    def __del__(self) -> None:
        pointer, self.pointer = getattr(self, "pointer", None), None
        if pointer:
            _runtime().cudaFreeHost(pointer)


def device_array(nbytes: int, stream) -> tuple[mx.array, int]:
    """A uint8 MLX array of `nbytes` whose pages live on the GPU, and its address."""
    rt = _runtime()
    array = mx.zeros((nbytes,), mx.uint8, stream=mx.cpu)
    mx.eval(array)
    pointer = address(array)
    location = _device_location()
    advice = rt.cudaMemoryAdvise.cudaMemAdviseSetPreferredLocation
    _check(rt.cudaMemAdvise(pointer, nbytes, advice, location), "cudaMemAdvise")
    _check(rt.cudaMemPrefetchAsync(pointer, nbytes, location, 0, stream), "cudaMemPrefetchAsync")
    _check(rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
    return array, pointer


def host_mapped(array: mx.array) -> None:
    """Advise an evaluated array's managed pages to stay in host memory and be read by the GPU in
    place (over the link) instead of migrating page by page."""
    rt = _runtime()
    pointer, nbytes = address(array), array.nbytes
    host = rt.cudaMemLocation()
    host.type = rt.cudaMemLocationType.cudaMemLocationTypeHost
    host.id = 0
    preferred = rt.cudaMemoryAdvise.cudaMemAdviseSetPreferredLocation
    _check(rt.cudaMemAdvise(pointer, nbytes, preferred, host), "cudaMemAdvise")
    accessed = rt.cudaMemoryAdvise.cudaMemAdviseSetAccessedBy
    _check(rt.cudaMemAdvise(pointer, nbytes, accessed, _device_location()), "cudaMemAdvise")


class CopyStream:
    """One non-blocking CUDA stream for host-to-device copies."""

    def __init__(self) -> None:
        rt = _runtime()
        self.handle = _check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreate")

    def copy(self, destination: int, source: int, nbytes: int) -> None:
        rt = _runtime()
        kind = rt.cudaMemcpyKind.cudaMemcpyDefault  # the destination is managed memory
        _check(rt.cudaMemcpyAsync(destination, source, nbytes, kind, self.handle), "cudaMemcpyAsync")

    def wait(self) -> None:
        _check(_runtime().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

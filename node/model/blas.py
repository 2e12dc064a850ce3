"""Bind MLX's CPU backend to a fast BLAS before MLX is first imported.

The mlx-cpu wheel on Linux bundles the reference netlib BLAS (~3 GFLOP/s for fp32 matmul).
`native/thin_sgemm.c` is a `cblas_sgemm` loaded with RTLD_GLOBAL before libmlx, so libmlx binds
it instead. It serves products with one or a few rows itself (sgemv, or a kernel that reads the
weights once for up to 8 rows: every decode step) and passes the rest to OpenBLAS.

OpenBLAS comes from the `scipy-openblas32` wheel: a DYNAMIC_ARCH build that picks its kernels
from the CPU it runs on (AVX-512, AVX2, ...) and prefixes its symbols (`scipy_cblas_sgemm`), so
the shim receives them as pointers. (`cmeel-openblas`, used before, is built for SkylakeX only and
dies with SIGILL on AVX2 machines.) The shim is compiled once with the system C compiler, cached,
and dispatches on CPU features itself (target_clones). Without a compiler MLX keeps its slow
reference BLAS, and the node says so.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import sys
from pathlib import Path

from node import native
from node.config import switch_on

logger = logging.getLogger(__name__)

THIN_SGEMM_SOURCE = Path(__file__).parent / "native" / "thin_sgemm.c"

_bound: str | None = None
_thin: ctypes.CDLL | None = None
_openblas: ctypes.CDLL | None = None
_threads = 0


def _openblas_library() -> Path | None:
    try:
        import scipy_openblas32
    except ImportError:
        return None
    path = Path(scipy_openblas32.get_lib_dir()) / f"lib{scipy_openblas32.get_library()}.so"
    return path if path.exists() else None


def build_thin_sgemm(cache_dir: Path | None = None) -> Path | None:
    """Compile `thin_sgemm.c` once per source version; None when no C compiler works."""
    return native.build(THIN_SGEMM_SOURCE, ("-fopenmp-simd", "-pthread"), cache_dir)


def _cuda_build_installed() -> bool:
    """MLX's CUDA build (`mlx-cuda-12`/`-13`) is installed (asked before mlx is imported)."""
    from importlib.metadata import PackageNotFoundError, distribution

    for name in ("mlx-cuda-13", "mlx-cuda-12"):
        try:
            distribution(name)
            return True
        except PackageNotFoundError:
            continue
    return False


def bind_fast_blas() -> str | None:
    """Load the thin-product shim and OpenBLAS on Linux; return OpenBLAS's path, or None where
    it is not needed (macOS: Accelerate) or cannot be bound (warned once).

    NODE_THIN_SGEMM=0 leaves every matmul to OpenBLAS's sgemm.
    """
    global _bound, _thin, _openblas
    if _bound is not None or platform.system() != "Linux":
        return _bound
    if "mlx.core" in sys.modules:
        logger.warning(
            "mlx was imported before node.model bound the fast BLAS: CPU matmul runs on the reference "
            "BLAS, 30-70x slower. Import node.model (or anything under node.runtime/node.memory) first."
        )
        return None
    if _cuda_build_installed():
        logger.debug("MLX's CUDA build is installed: the model runs on the GPU, no CPU BLAS to bind")
        return None
    library = _openblas_library()
    if library is None:
        logger.warning("scipy-openblas32 not found; MLX falls back to its slow reference BLAS")
        return None
    shim_path = build_thin_sgemm()
    if shim_path is None:
        return None
    # The shim goes first and global so that libmlx binds its cblas_sgemm.
    thin = ctypes.CDLL(str(shim_path), mode=ctypes.RTLD_GLOBAL)
    openblas = ctypes.CDLL(str(library))
    thin.node_blas_bind.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    thin.node_blas_bind(
        ctypes.cast(openblas.scipy_cblas_sgemm, ctypes.c_void_p),
        ctypes.cast(openblas.scipy_cblas_sgemv, ctypes.c_void_p),
    )
    thin.node_blas_thin_calls.restype = ctypes.c_long
    thin.node_blas_set_thin(int(switch_on("THIN_SGEMM")))
    _thin, _openblas = thin, openblas
    _bound = str(library)
    logger.debug("bound OpenBLAS from %s through %s", library, shim_path)
    return _bound


def set_blas_threads(threads: int) -> None:
    """Size OpenBLAS's thread pool, the shim's few-row kernel and node's CPU extension's pool: nodes sharing a machine must not
    oversubscribe its cores (two nodes with a thread per core each decoded 6x slower, not 2x)."""
    global _threads
    _threads = int(threads)
    if _openblas is not None:
        _openblas.scipy_openblas_set_num_threads(_threads)
    if _thin is not None:
        _thin.node_blas_set_threads(_threads)
    extension = sys.modules.get("node.model.cpu_extension")  # imports mlx, so only if already loaded
    if extension is not None:
        extension.set_threads(_threads)


def blas_threads() -> int:
    """The compute threads set by `set_blas_threads` (0: one per online CPU)."""
    return _threads


def thin_calls() -> int | None:
    """How many sgemm calls the thin paths served so far; None when the library is not loaded."""
    return None if _thin is None else _thin.node_blas_thin_calls()


def set_thin_sgemm(on: bool) -> bool:
    """Turn the thin paths on or off (for side-by-side benchmarks); False when not loaded."""
    if _thin is None:
        return False
    _thin.node_blas_set_thin(int(on))
    return True

"""Bind MLX's CPU backend to a fast BLAS before MLX is first imported.

The mlx-cpu wheel on Linux bundles the reference netlib BLAS (~3 GFLOP/s for fp32 matmul).
Loading OpenBLAS from the `cmeel-openblas` wheel with RTLD_GLOBAL before libmlx is loaded makes
libmlx resolve `cblas_sgemm` there instead (~110-250 GFLOP/s on the 2-core CI machine). This must
run before anything in the process imports `mlx`, so entry points call `bind_fast_blas()` first.

MLX sends every fp32 matmul to `cblas_sgemm`, and OpenBLAS's sgemm is 2-6x slower than needed
when one operand has one or a few rows, which is every decode step. `native/thin_sgemm.c` is a
`cblas_sgemm` that serves such products itself (sgemv, or a kernel that reads the weights once
for up to 8 rows) and passes the rest to OpenBLAS. It is compiled once with the system C compiler
(MLX's own CPU kernel fusion needs one too), cached, and loaded ahead of OpenBLAS. Without a
compiler everything still works, only decode is slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from node.config import user_cache_dir

logger = logging.getLogger(__name__)

THIN_SGEMM_SOURCE = Path(__file__).parent / "native" / "thin_sgemm.c"

_bound: str | None = None
_thin: ctypes.CDLL | None = None


def _openblas_candidates() -> list[Path]:
    roots = {Path(sysconfig.get_paths()["purelib"]), Path(sysconfig.get_paths()["platlib"])}
    roots.update(Path(p) for p in sys.path if p.endswith("site-packages"))
    return [root / "cmeel.prefix" / "lib" / "libopenblas.so.0" for root in roots]


def _compiler() -> str | None:
    found = (shutil.which(name) for name in (os.environ.get("CC"), "cc", "gcc", "clang") if name)
    return next((path for path in found if path), None)


def build_thin_sgemm(cache_dir: Path | None = None) -> Path | None:
    """Compile `thin_sgemm.c` once per source version; None when no C compiler works."""
    source = THIN_SGEMM_SOURCE.read_bytes()
    target = (
        cache_dir or user_cache_dir() / "native"
    ) / f"thin_sgemm-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if target.exists():
        return target
    compiler = _compiler()
    if compiler is None:
        logger.warning("no C compiler found (cc, gcc, clang): decode matmuls stay on OpenBLAS sgemm (slower)")
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        command = [
            compiler,
            "-O3",
            "-fopenmp-simd",
            "-pthread",
            "-shared",
            "-fPIC",
            "-o",
            str(built),
            str(THIN_SGEMM_SOURCE),
        ]
        try:
            result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as e:
            result = subprocess.CompletedProcess(command, -1, "", str(e))
        if result.returncode != 0:
            logger.warning("building %s failed: %s", THIN_SGEMM_SOURCE.name, result.stderr.strip()[-500:])
            return None
        os.replace(built, target)
    for stale in target.parent.glob("thin_sgemm-*.so"):
        if stale != target:
            stale.unlink(missing_ok=True)  # builds of older sources (a loaded copy stays valid)
    return target


def bind_fast_blas() -> str | None:
    """Load OpenBLAS globally on Linux; return its path, or None where it is not needed or found.

    NODE_THIN_SGEMM=0 leaves every matmul to OpenBLAS's sgemm.
    """
    global _bound, _thin
    if _bound is not None or platform.system() != "Linux":
        return _bound
    if "mlx.core" in sys.modules:
        logger.warning("mlx was imported before the fast BLAS was bound; CPU matmul will be slow")
        return None
    candidate = next((c for c in _openblas_candidates() if c.exists()), None)
    if candidate is None:
        logger.warning("cmeel-openblas not found; MLX falls back to its slow reference BLAS")
        return None
    thin_path = None if os.environ.get("NODE_THIN_SGEMM") == "0" else build_thin_sgemm()
    # The thin-product library goes first so that libmlx binds its cblas_sgemm, not OpenBLAS's.
    thin = ctypes.CDLL(str(thin_path), mode=ctypes.RTLD_GLOBAL) if thin_path else None
    openblas = ctypes.CDLL(str(candidate), mode=ctypes.RTLD_GLOBAL)
    if thin is not None:
        thin.node_blas_bind.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        thin.node_blas_bind(
            ctypes.cast(openblas.cblas_sgemm, ctypes.c_void_p),
            ctypes.cast(openblas.cblas_sgemv, ctypes.c_void_p),
        )
        thin.node_blas_thin_calls.restype = ctypes.c_long
        _thin = thin
    _bound = str(candidate)
    logger.debug("bound OpenBLAS from %s (thin products: %s)", candidate, thin_path)
    return _bound


def thin_calls() -> int | None:
    """How many sgemm calls the thin paths served so far; None when the library is not loaded."""
    return None if _thin is None else _thin.node_blas_thin_calls()


def set_thin_sgemm(on: bool) -> bool:
    """Turn the thin paths on or off (for side-by-side benchmarks); False when not loaded."""
    if _thin is None:
        return False
    _thin.node_blas_set_thin(int(on))
    return True

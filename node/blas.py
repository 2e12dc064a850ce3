"""Bind MLX's CPU backend to a fast BLAS before MLX is first imported.

The mlx-cpu wheel on Linux bundles the reference netlib BLAS (~3 GFLOP/s for fp32 matmul).
Loading OpenBLAS from the `cmeel-openblas` wheel with RTLD_GLOBAL before libmlx is loaded makes
libmlx resolve `cblas_sgemm` there instead (~250 GFLOP/s on the 2-core CI machine). This must run
before anything in the process imports `mlx`, so entry points call `bind_fast_blas()` first.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import sys
import sysconfig
from pathlib import Path

logger = logging.getLogger(__name__)

_bound: str | None = None


def _openblas_candidates() -> list[Path]:
    roots = {Path(sysconfig.get_paths()["purelib"]), Path(sysconfig.get_paths()["platlib"])}
    roots.update(Path(p) for p in sys.path if p.endswith("site-packages"))
    return [root / "cmeel.prefix" / "lib" / "libopenblas.so.0" for root in roots]


def bind_fast_blas() -> str | None:
    """Load OpenBLAS globally on Linux; return its path, or None where it is not needed or found."""
    global _bound
    if _bound is not None or platform.system() != "Linux":
        return _bound
    if "mlx.core" in sys.modules:
        logger.warning("mlx was imported before the fast BLAS was bound; CPU matmul will be slow")
        return None
    for candidate in _openblas_candidates():
        if candidate.exists():
            ctypes.CDLL(str(candidate), mode=ctypes.RTLD_GLOBAL)
            _bound = str(candidate)
            logger.debug("bound OpenBLAS from %s", candidate)
            return _bound
    logger.warning("cmeel-openblas not found; MLX falls back to its slow reference BLAS")
    return None

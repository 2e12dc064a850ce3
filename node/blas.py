"""Bind MLX's CPU backend to a fast BLAS before MLX is first imported.

The mlx-cpu wheel on Linux bundles the reference netlib BLAS (~3 GFLOP/s for fp32 matmul).
Loading OpenBLAS from the `cmeel-openblas` wheel with RTLD_GLOBAL before libmlx is loaded makes
libmlx resolve `cblas_sgemm` there instead (~110-250 GFLOP/s on the 2-core CI machine). This must
run before anything in the process imports `mlx`, so entry points call `bind_fast_blas()` first.

MLX sends every fp32 matmul to `cblas_sgemm`, and OpenBLAS's sgemm is 3-6x slower than its sgemv
when one operand is a single row, which is every decode step. `native/sgemm_forward.c` is a
`cblas_sgemm` that forwards such products to `cblas_sgemv`; it is compiled once with the system C
compiler (MLX's own CPU kernel fusion needs one too), cached, and loaded ahead of OpenBLAS.
Without a compiler everything still works, only decode is slower.
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

logger = logging.getLogger(__name__)

FORWARD_SOURCE = Path(__file__).parent / "native" / "sgemm_forward.c"

_bound: str | None = None
_forward: ctypes.CDLL | None = None


def _openblas_candidates() -> list[Path]:
    roots = {Path(sysconfig.get_paths()["purelib"]), Path(sysconfig.get_paths()["platlib"])}
    roots.update(Path(p) for p in sys.path if p.endswith("site-packages"))
    return [root / "cmeel.prefix" / "lib" / "libopenblas.so.0" for root in roots]


def native_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "persistent-agent-node" / "native"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build_forwarding_library(cache_dir: Path | None = None) -> Path | None:
    """Compile `sgemm_forward.c` once per source version; None when no C compiler works."""
    source = FORWARD_SOURCE.read_bytes()
    target = (cache_dir or native_cache_dir()) / f"sgemm_forward-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if target.exists():
        return target
    compiler = _compiler()
    if compiler is None:
        logger.warning("no C compiler found (cc, gcc, clang): single-row matmuls stay on OpenBLAS sgemm")
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        command = [compiler, "-O2", "-shared", "-fPIC", "-o", str(built), str(FORWARD_SOURCE)]
        try:
            result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as e:
            result = subprocess.CompletedProcess(command, -1, "", str(e))
        if result.returncode != 0:
            logger.warning("building %s failed: %s", FORWARD_SOURCE.name, result.stderr.strip()[-500:])
            return None
        os.replace(built, target)
    return target


def bind_fast_blas() -> str | None:
    """Load OpenBLAS globally on Linux; return its path, or None where it is not needed or found."""
    global _bound, _forward
    if _bound is not None or platform.system() != "Linux":
        return _bound
    if "mlx.core" in sys.modules:
        logger.warning("mlx was imported before the fast BLAS was bound; CPU matmul will be slow")
        return None
    candidate = next((c for c in _openblas_candidates() if c.exists()), None)
    if candidate is None:
        logger.warning("cmeel-openblas not found; MLX falls back to its slow reference BLAS")
        return None
    forward_path = None if os.environ.get("NODE_GEMV_FORWARD") == "0" else build_forwarding_library()
    # The forwarding library goes first so that libmlx binds its cblas_sgemm, not OpenBLAS's.
    forward = ctypes.CDLL(str(forward_path), mode=ctypes.RTLD_GLOBAL) if forward_path else None
    openblas = ctypes.CDLL(str(candidate), mode=ctypes.RTLD_GLOBAL)
    if forward is not None:
        forward.node_blas_bind.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        forward.node_blas_bind(
            ctypes.cast(openblas.cblas_sgemm, ctypes.c_void_p),
            ctypes.cast(openblas.cblas_sgemv, ctypes.c_void_p),
        )
        forward.node_blas_forwarded_calls.restype = ctypes.c_long
        _forward = forward
    _bound = str(candidate)
    logger.debug("bound OpenBLAS from %s (gemv forwarding: %s)", candidate, forward_path)
    return _bound


def forwarded_calls() -> int | None:
    """How many sgemm calls went to sgemv so far; None when the forwarding library is not loaded."""
    return None if _forward is None else _forward.node_blas_forwarded_calls()


def set_gemv_forwarding(on: bool) -> bool:
    """Turn forwarding on or off (for side-by-side benchmarks); False when it is not loaded."""
    if _forward is None:
        return False
    _forward.node_blas_set_forwarding(int(on))
    return True

"""Build small C helpers once, with the system compiler, and cache them by source digest.

Used where numpy and MLX's CPU backend have no fast path (KV decoding on restore). Each source
dispatches on CPU features itself at run time, so one build serves the machine it runs on; without
a compiler the caller falls back to numpy and says so once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from node.config import user_cache_dir

logger = logging.getLogger(__name__)


def compiler() -> str | None:
    found = (shutil.which(name) for name in (os.environ.get("CC"), "cc", "gcc", "clang") if name)
    return next((path for path in found if path), None)


def build(source: Path, extra_flags: tuple[str, ...] = (), cache_dir: Path | None = None) -> Path | None:
    """`source` compiled into a shared library once per source version; None when that fails."""
    text = source.read_bytes()
    target = (
        cache_dir or user_cache_dir() / "native"
    ) / f"{source.stem}-{hashlib.sha256(text).hexdigest()[:16]}.so"
    if target.exists():
        return target
    cc = compiler()
    if cc is None:
        logger.warning("no C compiler found (cc, gcc, clang): %s falls back to a slower path", source.name)
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        command = [cc, "-O3", *extra_flags, "-shared", "-fPIC", "-o", str(built), str(source)]
        try:
            result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as e:
            result = subprocess.CompletedProcess(command, -1, "", str(e))
        if result.returncode != 0:
            logger.warning("building %s failed: %s", source.name, result.stderr.strip()[-500:])
            return None
        os.replace(built, target)
    for stale in target.parent.glob(f"{source.stem}-*.so"):
        if stale != target:
            stale.unlink(missing_ok=True)  # builds of older sources (a loaded copy stays valid)
    return target


def load(source: Path, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    path = build(source, extra_flags)
    return None if path is None else ctypes.CDLL(str(path))

"""Durable file updates: what a write must flush before the rename that publishes it."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush `path` (a file, or a folder's entries) to disk, so a rename never outlives its data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(target: Path, parts: list, temporary: Path) -> None:
    """Write `parts` (buffers, one after the other) to `temporary`, flush it, rename it over
    `target` and flush the folder: a reader finds the old file or the whole new one, after a crash
    too."""
    try:
        with temporary.open("wb") as handle:
            handle.writelines(parts)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_path(target.parent)

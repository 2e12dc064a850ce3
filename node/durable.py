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

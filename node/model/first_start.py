"""Work done once per machine on first start, safe under concurrency and interruption.

Several processes may start together on an empty cache (the demo starts two nodes at once), and
any of them may be killed part-way. Every artifact made on first start follows one discipline:

- one inter-process lock per artifact, `<target>.lock` beside it (`filelock.FileLock`, an OS lock
  the kernel releases when its holder dies: a killed process never blocks the next start);
- only the lock holder builds, into a temporary name in the target's folder
  (`.<target name>.<random>.partial`), checks the result and publishes it with one `os.replace`,
  atomic within a filesystem: other processes see nothing or the whole artifact, never a part;
- temporary names exist only while their builder holds the lock, so the next holder deletes any
  it finds (leftovers of a killed builder);
- a process that finds the lock held says so through `progress`, then waits.

Files are checked against an expected size and sha256. A passed check is remembered in a stamp
beside the file (`<target>.verified`, keyed by size and mtime), so later starts hash nothing.
Folders are complete when they hold their marker file, which the builder writes last; as the
folder is published by a rename, a folder in place without its marker is a leftover to rebuild.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from node.durable import fsync_path
from node.errors import ModelImportError

Progress = Callable[[str], None]
WAIT_REPORT_S = 30.0
PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class Expected:
    """What a complete file is: its sha256 (hex) and, when known, its size in bytes."""

    sha256: str
    size: int | None = None


def file_digest(path: Path) -> str:
    """The sha256 (hex) of the file at `path`."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def exclusive(target: Path, what: str, progress: Progress) -> Iterator[None]:
    """Hold the inter-process lock of `target`; when another process holds it, say so and wait.

    `what` completes "waiting for another process to ..." (e.g. "assemble model.gguf").
    """
    lock = FileLock(_sibling(target, ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        progress(f"waiting for another process to {what} ...")
        _wait_for(lock, what, progress)
    try:
        yield
    finally:
        lock.release()


def _wait_for(lock: FileLock, what: str, progress: Progress) -> None:
    waited_s = 0.0
    while True:
        try:
            lock.acquire(timeout=WAIT_REPORT_S)
            return
        except Timeout:
            waited_s += WAIT_REPORT_S
            progress(f"still waiting for another process to {what} ({waited_s:.0f} s)")


def ensure_file(target: Path, write: Callable[[Path], None], expected: Expected, progress: Progress) -> Path:
    """Return `target` once it matches `expected`, calling `write(partial)` first when it does not.

    `write` fills the path it is given (an empty file in `target`'s folder) and never sees
    `target`; the result is published only after it matches `expected`. A file in place that
    fails its check (size first, then sha256) is written again.
    """
    if _stamped(target, expected):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(target, f"assemble {target.name}", progress):
        _remove_leftovers(target)
        if not _verified(target, expected, progress):
            _build_file(target, write, expected)
    return target


def ensure_folder(
    target: Path, build: Callable[[Path], None], marker: str, what: str, progress: Progress
) -> Path:
    """Return `target` once it holds `marker`, calling `build(staging)` first when it does not.

    `build` fills an empty staging folder beside `target` and writes `marker` last; the staging
    folder replaces `target` (and whatever partial folder was in place) in one rename.
    """
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(target, what, progress):
        _remove_leftovers(target)
        if not (target / marker).exists():
            _build_folder(target, build, marker)
    return target


def _sibling(target: Path, suffix: str) -> Path:
    return target.with_name(target.name + suffix)


def _new_partial(target: Path, folder: bool = False) -> Path:
    """A new, empty partial file (or folder) for `target`, beside it; modes follow the umask."""
    while True:
        partial = target.with_name(f".{target.name}.{secrets.token_hex(6)}{PARTIAL_SUFFIX}")
        try:
            if folder:
                partial.mkdir()
            else:
                os.close(os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return partial
        except FileExistsError:
            continue


def _remove_leftovers(target: Path) -> None:
    """Delete partial builds of `target`; only call while holding its lock (no live builder then)."""
    for leftover in target.parent.glob(f".{target.name}.*{PARTIAL_SUFFIX}"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _stamp_key(target: Path, expected: Expected) -> dict | None:
    try:
        stat = target.stat()
    except FileNotFoundError:
        return None
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": expected.sha256}


def _stamped(target: Path, expected: Expected) -> bool:
    """Whether `target` passed its check before and has not changed since (size and mtime)."""
    key = _stamp_key(target, expected)
    if key is None or (expected.size is not None and key["size"] != expected.size):
        return False
    try:
        return json.loads(_sibling(target, ".verified").read_text()) == key
    except (OSError, ValueError):
        return False


def _verified(target: Path, expected: Expected, progress: Progress) -> bool:
    """Whether `target` matches `expected`, hashing it at most once per (size, mtime)."""
    if not target.exists():
        return False
    if _stamped(target, expected):
        return True
    size = target.stat().st_size
    if expected.size is not None and size != expected.size:
        progress(f"{target} has {size} bytes, expected {expected.size}: assembling it again")
        return False
    if file_digest(target) != expected.sha256:
        progress(f"{target} fails its sha256 check: assembling it again")
        return False
    _write_stamp(target, expected)
    return True


def _write_stamp(target: Path, expected: Expected) -> None:
    stamp = _sibling(target, ".verified")
    partial = _new_partial(stamp)
    partial.write_text(json.dumps(_stamp_key(target, expected)))
    os.replace(partial, stamp)


def _build_file(target: Path, write: Callable[[Path], None], expected: Expected) -> None:
    partial = _new_partial(target)
    try:
        write(partial)
        _check_built(partial, target, expected)
        fsync_path(partial)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_path(target.parent)
    _write_stamp(target, expected)


def _check_built(partial: Path, target: Path, expected: Expected) -> None:
    size = partial.stat().st_size
    if expected.size is not None and size != expected.size:
        raise ModelImportError(f"building {target} wrote {size} bytes, expected {expected.size}")
    digest = file_digest(partial)
    if digest != expected.sha256:
        raise ModelImportError(f"building {target} gave sha256 {digest}, expected {expected.sha256}")


def _build_folder(target: Path, build: Callable[[Path], None], marker: str) -> None:
    staging = _new_partial(target, folder=True)
    try:
        build(staging)
        if not (staging / marker).exists():
            raise ModelImportError(f"building {target} did not write its marker {marker}")
        for path in staging.rglob("*"):
            fsync_path(path)
        if target.exists():
            shutil.rmtree(target)  # a partial folder from an older build: it has no marker
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_path(target.parent)

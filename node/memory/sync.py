"""Write-back of committed contexts to the shared object store, and pulls of contexts from it.

`RemoteTier` sits beside a `CheckpointStore` (the local disk stays the hot tier):

- After the checkpoint writer commits a context, `enqueue` hands its manifest to the uploader
  thread: the task's delivery never waits for the network. The thread uploads the blocks the store
  lacks, then the manifest as a new version (`ObjectStore.put_manifest`). Queued manifests of one
  context coalesce (only the newest is uploaded). `enqueue` waits only while more than
  `max_pending_bytes` of blocks are queued and the store is taking uploads (back-pressure, not
  loss); `close` flushes what is queued, within a deadline.
- Before a context is used, `pull` asks the store for its newest version
  (a LIST; the manifest is fetched only when that version is not one this node wrote or took);
  if it is newer than the local manifest (or there is none), the missing blocks are downloaded
  into memory, every tensor digest is checked there, and the local store adopts the manifest with
  those blocks in memory (`CheckpointStore.adopt`): the restore that follows reads them from
  memory, and their files, then the manifest, are written behind it (a crash before that leaves
  the previous version, and the next pull fetches the context again).
  A restore reads all of a context's last blocks but only the *head* of the older ones (token ids
  and the whole-history layers, `blocks`): ~4.5x fewer bytes at 8k tokens of Gemma 3. The store
  keeps a block's head and rest apart (`remote_store`; the uploaded manifest gives each block's
  head size as `split`), so a pull fetches just the heads of those blocks as partial blocks,
  adopts the manifest, and leaves the rests to `partial_blocks` (in the background, or at once for
  a read that needs it). The uploader also packs the heads of each run of PACK_BLOCKS full blocks
  into one object and names the packs in the manifest; a pull reads those heads from their pack
  (one GET for eight; from their own objects if the pack is missing or damaged, which is then
  deleted), and of the blocks of a pack it needs whole (the window's) just their rests, each
  joined in memory to its head from the pack. A pull also brings back any block its local
  context lacks.
- A store that does not answer makes neither path fail: uploads stay queued and are retried every
  `retry_s`, pulls find nothing, and `status()` (shown by /health) says so.

Versions are ordered by the manifest's commit time (`updated`): a node never writes a version for
a state older than the store's newest one, so a late upload cannot undo a newer turn run elsewhere.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from node.errors import CheckpointCorrupt, CheckpointError
from node.memory.blocks import BlockFile, Scratch
from node.memory.checkpoint import CheckpointStore, history_layers
from node.memory.checkpoint_format import BLOCK_TOKENS
from node.memory.partial_blocks import PartialBlocks
from node.memory.remote_store import ObjectStore, StoreUnavailable

logger = logging.getLogger(__name__)
MAX_PENDING_BYTES = 1 << 30
RETRY_S = 2.0
KEEP_VERSIONS = 2
PACK_BLOCKS = 8  # older blocks whose heads one object holds (`remote_store`: fewer GETs per pull)
TRANSFER_THREADS = 8  # parallel block uploads or downloads (blocks are ~4.7 MB at fp16)
CLOSE_TIMEOUT_S = 30.0


class _Superseded(Exception):
    """A queued manifest names a block deleted locally since: a newer save replaced it."""


@dataclass(frozen=True)
class Pull:
    agent_id: str
    version: int
    tokens: int
    blocks_downloaded: int
    bytes_downloaded: int
    seconds: float
    phases: dict  # seconds: "manifest" (LIST and GET), "transfer" (GETs, digests), "adopt"


class TransferPlan(NamedTuple):
    """What a pull of some blocks fetches."""

    apart: dict[str, int]  # the blocks stored as head and rest: key -> head bytes
    heads: set[str]  # those fetched as their heads alone (partial blocks)
    packs: list[list[str]]  # the packs read, each its blocks' keys in order
    rests: list[str]  # blocks of those packs fetched whole: their rest objects
    singles: list[str]  # the blocks fetched from their own objects


class RemoteTier:
    def __init__(
        self,
        store: CheckpointStore,
        remote: ObjectStore,
        *,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        retry_s: float = RETRY_S,
        window_start: Callable[[int], int] | None = None,
    ) -> None:
        """`window_start(tokens)`: the first position the model's sliding-window layers need at that
        context length (`window_start()` of its caches; None: every layer needs every position)."""
        self.store, self.remote = store, remote
        self.window_start = window_start
        self.max_pending_bytes, self.retry_s = max_pending_bytes, retry_s
        self._pending: OrderedDict[str, tuple[dict, int]] = OrderedDict()  # agent -> (manifest, bytes)
        self._changed = threading.Condition()
        self._known: dict[str, tuple[int, float]] = {}  # agent -> (version, updated) last seen in the store
        self._uploaded: set[str] = set()  # block keys the store holds
        self._splits: dict[str, int | None] = {}  # block key -> head size if stored apart (never changes)
        self._packed: set[str] = set()  # packs (by their last block) the store holds
        # blocks whose bytes here are the store's (this node uploaded them, or pulled them): two
        # nodes computing one prefix store one copy under its key, their floats may differ
        self._as_stored: set[str] = set()
        self._pull_locks: dict[str, threading.Lock] = {}
        self._closing = False
        self.reachable: bool | None = None
        self.last_error: str | None = None
        self.uploaded_bytes = self.uploaded_blocks = self.manifests_uploaded = 0
        self.downloaded_bytes = self.downloaded_blocks = 0
        self.upload_s = 0.0
        self.last_pull: Pull | None = None
        self._transfers = ThreadPoolExecutor(TRANSFER_THREADS, thread_name_prefix="block-store-transfer")
        started = threading.Barrier(TRANSFER_THREADS + 1)  # a pull (a failover) finds them running:
        for _ in range(TRANSFER_THREADS):  # spawning 8 under load held its first GETs back ~10 ms
            self._transfers.submit(started.wait)
        started.wait()
        self.partial = PartialBlocks(store, remote, self._verify, self._unreachable, retry_s)
        self._thread = threading.Thread(target=self._loop, name="block-store-uploader", daemon=True)
        self._thread.start()

    # ---- write-back ----------------------------------------------------------------------
    def enqueue(self, manifest: dict) -> None:
        """Queue a committed manifest for upload (called on the checkpoint writer's thread)."""
        size = sum(
            self._local_size(ref["key"]) for ref in manifest["blocks"] if ref["key"] not in self._uploaded
        )
        with self._changed:
            self._changed.wait_for(
                lambda: (
                    self._pending_bytes() <= self.max_pending_bytes or self._closing or not self.reachable
                ),
                timeout=None,
            )
            self._pending.pop(manifest["agent_id"], None)
            self._pending[manifest["agent_id"]] = (manifest, size)
            self._changed.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued manifest is in the store; False if `timeout` passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._pending, timeout)

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Flush (within `timeout`: an unreachable store keeps the rest local), then stop."""
        self.partial.close(timeout)
        flushed = self.flush(timeout)
        if not flushed:
            logger.warning(
                "block store %s: %d contexts not uploaded at shutdown (they stay on local disk)",
                self.remote.url, len(self._pending),
            )  # fmt: skip
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._transfers.shutdown(wait=False, cancel_futures=True)
        self._thread.join(timeout=5)

    def _pending_bytes(self) -> int:
        return sum(size for _, size in self._pending.values())

    def _local_size(self, key: str) -> int:
        try:
            return self.store.blocks.path(key).stat().st_size
        except FileNotFoundError:
            return 0

    def _loop(self) -> None:
        self._try(self.remote.ensure_bucket)
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending or self._closing, timeout=self.retry_s)
                if self._closing:
                    return
                if not self._pending:
                    if self.reachable is False:
                        self._try(self.remote.ensure_bucket)  # probe, so /health recovers
                    continue
                agent_id, (manifest, _) = next(iter(self._pending.items()))
            if not self._try(self._upload, agent_id, manifest):
                with self._changed:
                    self._changed.wait_for(lambda: self._closing, timeout=self.retry_s)
                continue
            with self._changed:
                if self._pending.get(agent_id, (None,))[0] is manifest:
                    del self._pending[agent_id]
                else:
                    self._pending.move_to_end(agent_id)  # a newer save came meanwhile
                self._changed.notify_all()

    def _try(self, function, *args) -> bool:
        try:
            function(*args)
        except StoreUnavailable as e:
            self._unreachable(e)
            return False
        except _Superseded as e:
            logger.info("upload skipped: %s", e)
        if self.reachable is False:
            logger.info("block store %s reachable again", self.remote.url)
        self.reachable = True
        return True

    def _unreachable(self, error: StoreUnavailable) -> None:
        if self.reachable is not False:
            logger.warning("block store unreachable (serving from local disk, retrying): %s", error)
        self.reachable, self.last_error = False, str(error)
        with self._changed:
            self._changed.notify_all()  # writers waiting on back-pressure go on

    def _upload(self, agent_id: str, manifest: dict) -> None:
        """The blocks the store lacks (in parallel), then the manifest: never a version naming a
        block the store does not hold."""
        started = time.perf_counter()
        if self.reachable is not True:
            self.remote.ensure_bucket()
        keys = [key for key in _keys(manifest) if key not in self._uploaded]
        sent = list(self._transfers.map(lambda key: self._upload_block(agent_id, key), keys))
        self._uploaded.update(keys)
        self.uploaded_bytes += sum(sent)
        self.uploaded_blocks += sum(1 for size in sent if size)
        self._put_manifest(agent_id, self._with_packs(agent_id, self._with_splits(manifest)))
        self.upload_s += time.perf_counter() - started

    def _with_packs(self, agent_id: str, manifest: dict) -> dict:
        """The manifest naming the packs of its older blocks' heads (`remote_store`) that the
        store holds, each packed and uploaded first where this node's copies of its blocks are the
        store's (a pack's heads must match the rests in the store)."""
        named = []
        for group in _groups(manifest):
            last = group[-1]["key"]
            if last not in self._packed:
                if all(ref["key"] in self._as_stored for ref in group):
                    try:
                        heads = [self.store.blocks.head(ref["key"], ref["split"]) for ref in group]
                    except FileNotFoundError:
                        raise _Superseded(f"a block of context {agent_id!r} left the local disk") from None
                    self.uploaded_bytes += self.remote.put_pack(last, heads)
                elif not self.remote.has_pack(last):
                    continue
                self._packed.add(last)
            named.append(last)
        return {**manifest, "packs": named}

    def _with_splits(self, manifest: dict) -> dict:
        """The manifest with the head size of each block stored as head and rest, for pulls."""
        blocks = []
        for ref in manifest["blocks"]:
            split = self._split(ref["key"])
            blocks.append(ref if split is None else {**ref, "split": split})
        return {**manifest, "blocks": blocks}

    def _split(self, key: str) -> int | None:
        """The block's head size (`BlockFile.head_bytes`) if it is less than the whole block: then
        the store keeps head and rest apart."""
        if key not in self._splits:
            try:
                block = self.store.blocks.open(key)
            except CheckpointError:
                return None
            try:
                head, whole = block.head_bytes(), block.whole_bytes()
            finally:
                block.close()
            self._splits[key] = head if head is not None and head < whole else None
        return self._splits[key]

    def _upload_block(self, agent_id: str, key: str) -> int:
        split = self._split(key)
        try:
            sent = self.remote.put_block(key, self.store.blocks.path(key), split)
            if sent:
                self._as_stored.add(key)
            return sent
        except FileNotFoundError:
            if not self.remote.has_block(key, split is not None):
                raise _Superseded(f"block {key} of context {agent_id!r} left the local disk") from None
            return 0

    def _put_manifest(self, agent_id: str, manifest: dict) -> None:
        known = self._known.get(agent_id)
        for _ in range(8):
            if known is None:  # the highest version number, and the newest state of those readable
                versions = self.remote.versions(agent_id)
                latest = self.remote.latest_manifest(agent_id, versions)
                known = (versions[-1] if versions else 0, float(latest["updated"]) if latest else 0.0)
            version, updated = known
            if updated >= float(manifest["updated"]):
                return  # the store holds this state or a newer one (written by another node)
            if self.remote.put_manifest(agent_id, version + 1, manifest):
                self._known[agent_id] = (version + 1, float(manifest["updated"]))
                self.manifests_uploaded += 1
                if version + 1 > KEEP_VERSIONS:
                    self.remote.delete_versions(agent_id, [version + 1 - KEEP_VERSIONS])
                return
            known = None  # another node wrote that version: read the newest and decide again
        raise StoreUnavailable(f"context {agent_id!r}: versions keep changing under this node")

    # ---- pulls ---------------------------------------------------------------------------
    def pull(self, agent_id: str) -> Pull | None:
        """Bring the store's newest version of a context here when it is newer than the local one."""
        lock = self._pull_locks.setdefault(agent_id, threading.Lock())
        with lock:
            try:
                return self._pull(agent_id)
            except StoreUnavailable as e:
                self._unreachable(e)
                return None
            except CheckpointError as e:
                logger.warning("context %r from the block store refused: %s", agent_id, e)
                return None

    def _pull(self, agent_id: str) -> Pull | None:
        started = time.perf_counter()
        try:
            local = self.store.manifest(agent_id)
        except CheckpointError:
            local = None
        versions = self.remote.versions(agent_id)
        self.reachable = True
        known = self._known.get(agent_id)
        if versions and known and versions[-1] == known[0] and local and float(local["updated"]) >= known[1]:
            latest = None  # the store's newest version is one this node wrote or took: one LIST a turn
        else:
            latest = self.remote.latest_manifest(agent_id, versions)
        if latest is not None and latest.get("model_fingerprint") != self.store.fingerprint:
            latest = None
        newer = latest is not None and (
            local is None or float(local.get("updated") or 0) < float(latest.get("updated") or 0)
        )
        if latest is not None:
            seen = (latest["version"], float(latest.get("updated") or 0))
            self._known[agent_id] = max(self._known.get(agent_id, (0, 0.0)), seen)
        manifest = latest if newer else local
        if manifest is None:
            return None
        decided = time.perf_counter()
        keys = [key for key in _keys(manifest) if not self.store.blocks.held(key)]
        if not newer and not keys:
            return None
        plan = self._transfer_plan(manifest, keys)
        apart, heads = plan.apart, plan.heads

        def download(key: str) -> list[tuple[str, BlockFile, np.ndarray]]:
            return [(key, *self._download(key, key in apart, key in heads))]

        # the rests of packed blocks wanted whole first (their packs' jobs wait for them), then the
        # longest first: whole blocks (head and rest), packs, single heads
        rests = {key: self._transfers.submit(self.remote.read_rest, key) for key in plan.rests}
        jobs = [functools.partial(download, key) for key in plan.singles if key not in heads]
        jobs += [functools.partial(self._download_pack, group, apart, rests) for group in plan.packs]
        jobs += [functools.partial(download, key) for key in plan.singles if key in heads]
        fetched = [block for blocks in self._transfers.map(lambda job: job(), jobs) for block in blocks]
        transferred = time.perf_counter()
        self._as_stored.update(key for key, _, _ in fetched)
        self.store.adopt(
            manifest,
            {key: tokens for key, _, tokens in fetched},
            {key: (block, key in heads) for key, block, _ in fetched},
        )
        self.partial.defer(agent_id, sorted(heads))
        # blocks stored whole by an older node are uploaded again as head and rest with this
        # node's next version of the context: only the others are known to be in the store
        self._uploaded.update(apart)
        self._splits.update(apart)
        ended = time.perf_counter()
        phases = {
            "manifest": decided - started,
            "transfer": transferred - decided,
            "adopt": ended - transferred,
        }
        pulled = Pull(
            agent_id, int(manifest.get("version") or 0), int(manifest["token_count"]), len(keys),
            sum(block.held_bytes() for _, block, _ in fetched),
            ended - started, {name: round(seconds, 4) for name, seconds in phases.items()},
        )  # fmt: skip
        self.downloaded_bytes += pulled.bytes_downloaded
        self.downloaded_blocks += pulled.blocks_downloaded
        self.last_pull = pulled
        logger.info(
            "pulled context %r (version %d, %d tokens) from the block store: %d blocks (%d of them their "
            "heads, the rest in the background), %.1f MB in %.0f ms",
            agent_id, pulled.version, pulled.tokens, len(keys), len(heads), pulled.bytes_downloaded / 1e6,
            pulled.seconds * 1000,
        )  # fmt: skip
        return pulled

    def objects(self, manifest: dict) -> list[str]:
        """The objects a pull of this version fetches before the restore on a node holding none of
        its blocks (the bench's transfer floor)."""
        plan = self._transfer_plan(manifest, _keys(manifest))
        return (
            [self.remote.pack_key(group[-1]) for group in plan.packs]
            + [self.remote.block_key(key, "rest") for key in plan.rests]
            + [
                name
                for key in plan.singles
                for name in self.remote.block_objects(key, key in plan.apart, key in plan.heads)
            ]
        )

    def _transfer_plan(self, manifest: dict, keys: list[str]) -> TransferPlan:
        apart = _apart(manifest)
        heads = self._heads(manifest, keys, apart)
        packs = _packed_groups(manifest, keys)
        packed = {key for group in packs for key in group}
        rests = [key for group in packs for key in group if key not in heads]
        return TransferPlan(apart, heads, packs, rests, [key for key in keys if key not in packed])

    def _heads(self, manifest: dict, keys: list[str], apart: dict[str, int]) -> set[str]:
        """Of the blocks to fetch, those stored as head and rest (`apart`) whose head is all a
        restore reads (every position before the sliding-window layers' window)."""
        if self.window_start is None:
            return set()
        window = self.window_start(int(manifest["token_count"]))
        wanted = set(keys)
        return {
            ref["key"]
            for ref in manifest["blocks"]
            if ref["key"] in wanted and ref["key"] in apart and ref["start"] + ref["length"] <= window
        }

    def _download_pack(
        self, group: list[str], apart: dict[str, int], rests: dict[str, Future]
    ) -> list[tuple[str, BlockFile, np.ndarray]]:
        """A pack's blocks: their heads from the pack, each checked as a partial block, and joined
        to their rests where the pull fetches a block whole (`rests`: the rests' GETs under way)."""
        return [
            (key, *self._joined(key, block, rests[key])) if key in rests else (key, block, tokens)
            for key, block, tokens in self._pack_heads(group, apart)
        ]

    def _joined(self, key: str, head: BlockFile, rest: Future) -> tuple[BlockFile, np.ndarray]:
        """A block's checked head and its rest (once fetched) as the whole block in memory, not
        copied, its digests checked (`_verify`)."""
        data = rest.result()
        if data is None:
            raise CheckpointError(f"block {key} is missing from the block store")
        return self._verify(key, data=[*head.buffers, data])

    def _pack_heads(self, group: list[str], apart: dict[str, int]) -> list[tuple[str, BlockFile, np.ndarray]]:
        """The heads of a pack's blocks from its one object, each checked as a partial block; from
        their own objects if the pack is missing or damaged (a damaged pack is deleted)."""
        data = self.remote.read_pack(group[-1])
        if data is not None:
            view, offset, unpacked = memoryview(data), 0, []
            try:
                for key in group:
                    head = view[offset : offset + apart[key]]
                    offset += len(head)
                    unpacked.append((key, *self._check(key, data=[head], partial=True)))
                if offset == len(view):
                    self._packed.add(group[-1])  # in the store: this node need not upload it
                    return unpacked
                raise CheckpointCorrupt(f"pack {group[-1]} holds {len(view)} bytes, its heads {offset}")
            except CheckpointCorrupt as e:
                logger.warning("a pack of block heads in the block store is damaged, deleted: %s", e)
                self._packed.discard(group[-1])
                self.remote.delete_pack(group[-1])
        return [(key, *self._download(key, True, True)) for key in group]

    def _download(self, key: str, split: bool, head_only: bool) -> tuple[BlockFile, np.ndarray]:
        """One block (or its head alone, as a partial block) into memory, its digests checked:
        the block and its token ids."""
        data = self.remote.read_block(key, split, head_only)
        if data is None:
            raise CheckpointError(f"block {key} is missing from the block store")
        return self._verify(key, data=data, partial=head_only)

    def _verify(self, key: str, path=None, partial: bool = False, data=None) -> tuple[BlockFile, np.ndarray]:
        """`_check`, and a damaged object is deleted from the store (content addressed: the next
        node that computes this block uploads it again)."""
        try:
            return self._check(key, path, partial, data)
        except CheckpointCorrupt:
            self._discard(key)
            raise

    @staticmethod
    def _check(
        key: str, path=None, partial: bool = False, data: list | None = None
    ) -> tuple[BlockFile, np.ndarray]:
        """Check every tensor's digest of a block file, or of its bytes in memory (`data`; of a
        partial block: those it holds, which must cover its head): the block (closed; one in
        memory stays readable) and its token ids."""
        block = BlockFile(path, key, Scratch() if data is None else None, data=data)
        try:
            head = block.head_bytes()
            if partial and (head is None or head > block.held_bytes()):
                raise CheckpointCorrupt(f"block {key}: the head object in the store is short")
            for name in block.present() if partial else block.meta["digests"]:
                if name != "tokens":
                    block.tensor(name)
            return block, block.tokens()  # checked too
        finally:
            block.close()

    def _discard(self, key: str) -> None:
        self._uploaded.discard(key)
        self.remote.delete_block(key)

    # ---- reporting -----------------------------------------------------------------------
    def status(self) -> dict:
        with self._changed:
            pending, pending_bytes = len(self._pending), self._pending_bytes()
        pull = self.last_pull
        return {
            "url": str(self.remote.url),
            "reachable": self.reachable,
            "last_error": self.last_error,
            "pending_contexts": pending,
            "pending_bytes": pending_bytes,
            "max_pending_bytes": self.max_pending_bytes,
            "uploaded_bytes": self.uploaded_bytes,
            "uploaded_blocks": self.uploaded_blocks,
            "manifests_uploaded": self.manifests_uploaded,
            "downloaded_bytes": self.downloaded_bytes + self.partial.downloaded_bytes,
            "downloaded_blocks": self.downloaded_blocks,
            "completing_blocks": self.partial.pending(),
            "completed_blocks": self.partial.completed_blocks,
            "last_pull": None if pull is None else {**pull.__dict__, "seconds": round(pull.seconds, 4)},
        }


def _keys(manifest: dict) -> list[str]:
    """A manifest's block keys, each once, in order."""
    return list(dict.fromkeys(ref["key"] for ref in manifest["blocks"]))


def _groups(manifest: dict) -> list[list[dict]]:
    """The block refs of a manifest (with head sizes: `split`) that packs hold: each run of
    PACK_BLOCKS full blocks from position 0 stored as head and rest."""
    refs = manifest["blocks"]
    groups = [refs[i : i + PACK_BLOCKS] for i in range(0, len(refs) - PACK_BLOCKS + 1, PACK_BLOCKS)]
    return [g for g in groups if all("split" in ref and ref["length"] == BLOCK_TOKENS for ref in g)]


def _packed_groups(manifest: dict, wanted: list[str]) -> list[list[str]]:
    """The block keys of the packs a manifest names all of whose blocks a pull fetches, each pack
    in order."""
    named, wanted = set(manifest.get("packs") or ()), set(wanted)
    keys = ([ref["key"] for ref in group] for group in _groups(manifest) if group[-1]["key"] in named)
    return [group for group in keys if wanted.issuperset(group)]


def _apart(manifest: dict) -> dict[str, int]:
    """The blocks a manifest says are stored as head and rest: key -> head bytes."""
    return {ref["key"]: ref["split"] for ref in manifest["blocks"] if "split" in ref}


def window_start(caches: list) -> Callable[[int], int] | None:
    """Where the sliding-window layers of a model with these caches start reading at a context
    length (None: it has no such layers)."""
    whole = history_layers(caches)
    sliding = [cache for i, cache in enumerate(caches) if i not in whole]
    if not sliding:
        return None
    return lambda tokens: min(cache.history_start(tokens) for cache in sliding)

"""Write-back of committed contexts to the shared object store, and pulls of contexts from it.

`RemoteTier` sits beside a `CheckpointStore` (the local disk stays the hot tier):

- After the checkpoint writer commits a context, `enqueue` hands its manifest to the uploader
  thread: the task's delivery never waits for the network. The thread uploads the blocks the store
  lacks, then the manifest as a new version (`ObjectStore.put_manifest`). Queued manifests of one
  context coalesce (only the newest is uploaded). `enqueue` waits only while more than
  `max_pending_bytes` of blocks are queued and the store is taking uploads (back-pressure, not
  loss); `close` flushes what is queued, within a deadline.
- Before a context that is not in memory is used, `pull` asks the store for its newest version;
  if it is newer than the local manifest (or there is none), the missing blocks are downloaded to
  temporary files, every tensor digest is checked, the files are renamed into place and the
  manifest is adopted by the local store. The restore that follows is an ordinary local one.
- A store that does not answer makes neither path fail: uploads stay queued and are retried every
  `retry_s`, pulls find nothing, and `status()` (shown by /health) says so.

Versions are ordered by the manifest's commit time (`updated`): a node never writes a version for
a state older than the store's newest one, so a late upload cannot undo a newer turn run elsewhere.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from node.errors import CheckpointCorrupt, CheckpointError
from node.memory.blocks import BlockFile, temporary_name
from node.memory.checkpoint import CheckpointStore
from node.memory.remote_store import ObjectStore, StoreUnavailable

logger = logging.getLogger(__name__)
MAX_PENDING_BYTES = 1 << 30
RETRY_S = 2.0
KEEP_VERSIONS = 2
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


class RemoteTier:
    def __init__(
        self,
        store: CheckpointStore,
        remote: ObjectStore,
        *,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        retry_s: float = RETRY_S,
    ) -> None:
        self.store, self.remote = store, remote
        self.max_pending_bytes, self.retry_s = max_pending_bytes, retry_s
        self._pending: OrderedDict[str, tuple[dict, int]] = OrderedDict()  # agent -> (manifest, bytes)
        self._changed = threading.Condition()
        self._known: dict[str, tuple[int, float]] = {}  # agent -> (version, updated) last seen in the store
        self._uploaded: set[str] = set()  # block keys the store holds
        self._pull_locks: dict[str, threading.Lock] = {}
        self._closing = False
        self.reachable: bool | None = None
        self.last_error: str | None = None
        self.uploaded_bytes = self.uploaded_blocks = self.manifests_uploaded = 0
        self.downloaded_bytes = self.downloaded_blocks = 0
        self.upload_s = 0.0
        self.last_pull: Pull | None = None
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
        flushed = self.flush(timeout)
        if not flushed:
            logger.warning(
                "block store %s: %d contexts not uploaded at shutdown (they stay on local disk)",
                self.remote.url, len(self._pending),
            )  # fmt: skip
        with self._changed:
            self._closing = True
            self._changed.notify_all()
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
        keys = list(dict.fromkeys(r["key"] for r in manifest["blocks"] if r["key"] not in self._uploaded))
        with ThreadPoolExecutor(TRANSFER_THREADS) as pool:
            sent = list(pool.map(lambda key: self._upload_block(agent_id, key), keys))
        self._uploaded.update(keys)
        self.uploaded_bytes += sum(sent)
        self.uploaded_blocks += sum(1 for size in sent if size)
        self._put_manifest(agent_id, manifest)
        self.upload_s += time.perf_counter() - started

    def _upload_block(self, agent_id: str, key: str) -> int:
        try:
            return self.remote.put_block(key, self.store.blocks.path(key))
        except FileNotFoundError:
            if not self.remote.has_block(key):
                raise _Superseded(f"block {key} of context {agent_id!r} left the local disk") from None
            return 0

    def _put_manifest(self, agent_id: str, manifest: dict) -> None:
        known = self._known.get(agent_id)
        for _ in range(8):
            if known is None:
                latest = self.remote.latest_manifest(agent_id)
                known = (latest["version"], float(latest.get("updated") or 0)) if latest else (0, 0.0)
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
        latest = self.remote.latest_manifest(agent_id)
        self.reachable = True
        if latest is None or latest.get("model_fingerprint") != self.store.fingerprint:
            return None
        try:
            local = self.store.manifest(agent_id)
        except CheckpointError:
            local = None
        newest = float(latest.get("updated") or 0)
        self._known[agent_id] = max(self._known.get(agent_id, (0, 0.0)), (latest["version"], newest))
        if local is not None and float(local.get("updated") or 0) >= newest:
            return None
        keys = [ref["key"] for ref in latest["blocks"] if not self.store.blocks.exists(ref["key"])]
        with ThreadPoolExecutor(TRANSFER_THREADS) as pool:
            sizes = list(pool.map(self._download, keys))
        self.store.adopt(latest)
        self._uploaded.update(ref["key"] for ref in latest["blocks"])
        pulled = Pull(
            agent_id, latest["version"], int(latest["token_count"]), len(keys), sum(sizes),
            time.perf_counter() - started,
        )  # fmt: skip
        self.downloaded_bytes += pulled.bytes_downloaded
        self.downloaded_blocks += pulled.blocks_downloaded
        self.last_pull = pulled
        logger.info(
            "pulled context %r (version %d, %d tokens) from the block store: %d blocks, %.1f MB in %.0f ms",
            agent_id, pulled.version, pulled.tokens, len(keys), pulled.bytes_downloaded / 1e6,
            pulled.seconds * 1000,
        )  # fmt: skip
        return pulled

    def _download(self, key: str) -> int:
        """One block into the local store, its digests checked before it is renamed into place."""
        target = self.store.blocks.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.parent / temporary_name(target.name)
        try:
            size = self.remote.get_block(key, temporary)
            if size is None:
                raise CheckpointError(f"block {key} is missing from the block store")
            self._verify(key, temporary)
            os.replace(temporary, target)
            return size
        finally:
            temporary.unlink(missing_ok=True)

    def _verify(self, key: str, path) -> None:
        """Check every tensor's digest; a damaged object is deleted from the store (content
        addressed: the next node that computes this block uploads it again)."""
        try:
            block = BlockFile(path, key)
            try:
                for name in block.meta["digests"]:
                    block.tensor(name)
            finally:
                block.close()
        except CheckpointCorrupt:
            self._uploaded.discard(key)
            self.remote.delete_block(key)
            raise

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
            "downloaded_bytes": self.downloaded_bytes,
            "downloaded_blocks": self.downloaded_blocks,
            "last_pull": None if pull is None else {**pull.__dict__, "seconds": round(pull.seconds, 4)},
        }

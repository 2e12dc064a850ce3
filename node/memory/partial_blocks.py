"""Completion of partial blocks: the rest of each block a pull fetched only the head of.

A pull (`node.memory.sync.RemoteTier`) fetches the heads of a context's older blocks, which is all
its restore reads (`node.memory.blocks`), and hands them here with `defer`. Their rests are fetched
on one background thread, once the context's restore is done (`start`, the store's `on_restore`)
or COMPLETE_AFTER_S after the pull, so that a transfer and a restore do not share the cores. A
read that needs a rest sooner (`complete_block`, the block store's `complete` hook) fetches it on
its own thread, or waits for the completion under way. Partial blocks found at start (a node
stopped before it completed them) are completed the same way.

Each completion copies the partial file, appends the rest (the store's `rest` object),
checks every tensor's digest and renames the whole block into place.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

from node.errors import BlockStoreUnavailable, CheckpointError
from node.memory.blocks import temporary_name
from node.memory.checkpoint import CheckpointStore
from node.memory.remote_store import ObjectStore, StoreUnavailable

COMPLETE_THREADS = 1  # one at a time, beside serving
COMPLETE_AFTER_S = 1.0  # a pull's completions start after its context's restore, or this long after
ATTEMPTS = 3
LEFTOVER = ""  # the `_deferred` entry of partial blocks found at start


class PartialBlocks:
    def __init__(
        self,
        store: CheckpointStore,
        remote: ObjectStore,
        verify: Callable[[str, Path], None],
        unreachable: Callable[[StoreUnavailable], None],
        retry_s: float,
    ) -> None:
        """`verify(key, path)` checks a whole block file (raising CheckpointCorrupt);
        `unreachable(error)` reports the store down; a failed fetch is retried after `retry_s`."""
        self.store, self.remote = store, remote
        self._verify, self._unreachable, self.retry_s = verify, unreachable, retry_s
        self.completed_blocks = 0
        self.downloaded_bytes = 0
        self._completions: dict[str, Future] = {}
        self._deferred: dict[str, list[str]] = {}  # agent -> partial blocks not yet being completed
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._completer = ThreadPoolExecutor(COMPLETE_THREADS, thread_name_prefix="block-store-completion")
        store.blocks.complete = self.complete_block
        store.on_restore = self.start
        self.defer(LEFTOVER, store.blocks.partial_keys())

    def defer(self, agent_id: str, keys: list[str]) -> None:
        """Complete these partial blocks of a context after its restore (or COMPLETE_AFTER_S)."""
        if not keys:
            return
        with self._lock:  # a newer pull of a context not yet restored adds to the last one's
            self._deferred.setdefault(agent_id, []).extend(keys)
        later = threading.Timer(COMPLETE_AFTER_S, self.start, [agent_id])
        later.daemon = True
        later.start()

    def start(self, agent_id: str) -> None:
        """Fetch the rest of a context's deferred partial blocks in the background."""
        with self._lock:
            keys = [] if self._stopped.is_set() else self._deferred.pop(agent_id, [])
        for key in keys:
            self._completion(key)

    def complete_block(self, key: str) -> Path:
        """A partial block's rest, now: fetched on the caller's thread unless a completion is
        under way. Raises BlockStoreUnavailable while the store does not answer."""
        with self._lock:
            future = self._completions.get(key)
            mine = future is None or future.cancel() or _failed(future)
            if mine:
                future = self._completions[key] = Future()
                future.set_running_or_notify_cancel()  # not cancellable by the next reader
        if mine:
            try:
                future.set_result(self._complete_retrying(key))
            except Exception as e:  # noqa: BLE001 - handed to every reader waiting on it
                future.set_exception(e)
        try:
            return future.result()
        except StoreUnavailable as e:
            raise BlockStoreUnavailable(
                f"block {key} is partial here and the block store does not answer"
            ) from e

    def pending(self) -> int:
        with self._lock:
            return len(self._completions) + sum(map(len, self._deferred.values()))

    def close(self, timeout: float) -> None:
        """Complete what is deferred or under way (within `timeout`), then stop; partial blocks
        left are completed after the next start."""
        for agent_id in list(self._deferred):
            self.start(agent_id)
        with self._lock:
            completing = list(self._completions.values())
        wait(completing, timeout)
        with self._lock:
            self._stopped.set()
        self._completer.shutdown(wait=False, cancel_futures=True)

    def _completion(self, key: str) -> Future:
        with self._lock:
            future = self._completions.get(key)
            if future is None or _failed(future):
                future = self._completions[key] = self._completer.submit(self._complete_retrying, key)
            return future

    def _complete_retrying(self, key: str) -> Path:
        try:
            for attempt in range(ATTEMPTS):
                try:
                    return self._complete(key)
                except StoreUnavailable as e:
                    self._unreachable(e)
                    if attempt == ATTEMPTS - 1:
                        raise
                    self._stopped.wait(self.retry_s)
        finally:
            with self._lock:
                self._completions.pop(key, None)

    def _complete(self, key: str) -> Path:
        blocks = self.store.blocks
        blocks.land(key)  # a head pulled into memory goes to its file first
        whole, partial = blocks.path(key), blocks.partial_path(key)
        if whole.exists():
            partial.unlink(missing_ok=True)
            return whole
        temporary = whole.parent / temporary_name(whole.name)
        try:
            try:
                shutil.copyfile(partial, temporary)
            except FileNotFoundError:
                if whole.exists():  # completed meanwhile
                    return whole
                raise CheckpointError(f"block {key} is neither whole nor partial here") from None
            size = self.remote.get_rest(key, temporary)
            if size is None:
                raise CheckpointError(f"block {key} is missing from the block store")
            self._verify(key, temporary)
            os.replace(temporary, whole)
        finally:
            temporary.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
        self.store.block_completed(key)
        self.downloaded_bytes += size
        self.completed_blocks += 1
        return whole


def _failed(future: Future) -> bool:
    return future.done() and (future.cancelled() or future.exception() is not None)

"""The one thread that owns MLX state: the model and every live cache.

Async code hands it jobs and awaits the result; nothing else touches MLX arrays. Between jobs the
thread advances the active generation sequences: one prefill chunk of the oldest prefilling
sequence (so a long prompt never freezes the others for more than a chunk), then one batched decode
step for all decoding sequences. A request that arrives while a batch runs joins it at the next
step; a finished sequence leaves without stalling the rest. If the thread dies, every waiting and
later call fails with `WorkerDead` instead of hanging.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from node.errors import WorkerDead
from node.runtime.batching import batched_step
from node.runtime.generation import Completion, Sequence, step

logger = logging.getLogger(__name__)
_STOP = object()


@dataclass
class _Active:
    sequence: Sequence
    on_done: Callable[[Completion | BaseException], None]


class ModelWorker:
    def __init__(self, model, max_batch: int = 8) -> None:
        self.model = model
        self.max_batch = max_batch
        self.batched = True
        self._jobs: queue.Queue = queue.Queue()
        self._active: list[_Active] = []
        self._dead: BaseException | None = None
        self.decode_steps = 0
        self.batched_steps = 0
        self.largest_batch = 0
        self.step_seconds: deque[float] = deque(maxlen=4096)  # the latest decode steps' durations
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="mlx-owner", daemon=True)
        self._thread.start()

    # ---- called from any thread -----------------------------------------------------------
    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self._dead is not None:
            raise WorkerDead(f"the model worker died: {self._dead!r}")
        if self._closed:
            raise WorkerDead("the model worker has been shut down")
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(self.submit(fn, *args))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._jobs.put(_STOP)
            self._thread.join()

    # ---- called on the worker thread ------------------------------------------------------
    def add_sequence(self, sequence: Sequence, on_done: Callable[[Completion | BaseException], None]) -> None:
        self._active.append(_Active(sequence, on_done))

    def busy(self) -> bool:
        """Sequences are prefilling or decoding (read from any thread: a snapshot)."""
        return bool(self._active)

    def stats(self) -> dict:
        return {
            "batched": self.batched,
            "max_batch": self.max_batch,
            "active_sequences": len(self._active),
            "decode_steps": self.decode_steps,
            "batched_steps": self.batched_steps,
            "largest_batch": self.largest_batch,
        }

    def _loop(self) -> None:
        try:
            while True:
                for job in self._next_jobs():
                    if job is _STOP:
                        self._drain_active()
                        return
                    self._run_job(*job)
                self._advance()
        except BaseException as e:
            logger.exception("model worker died")
            self._die(e)

    def _next_jobs(self) -> list:
        jobs = [] if self._active else [self._jobs.get()]
        while True:
            try:
                jobs.append(self._jobs.get_nowait())
            except queue.Empty:
                return jobs

    @staticmethod
    def _run_job(future: Future, fn: Callable[..., Any], args: tuple) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting caller
            future.set_exception(e)

    def _advance(self) -> None:
        for active in [a for a in self._active if not a.sequence.wants_step() and not a.sequence.prefilling]:
            self._finish(active)
        prefilling = [a for a in self._active if a.sequence.prefilling]
        if prefilling:
            self._guarded([prefilling[0]], lambda: prefilling[0].sequence.prefill_chunk())
            if not prefilling[0].sequence.prefilling:
                mx.clear_cache()
        decoding = [a for a in self._active if not a.sequence.prefilling and a.sequence.wants_step()]
        for start in range(0, len(decoding), self.max_batch):
            batch = decoding[start : start + self.max_batch]
            self._guarded(batch, lambda batch=batch: self._decode(batch))

    def _decode(self, batch: list[_Active]) -> None:
        started = time.perf_counter()
        self.decode_steps += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        if len(batch) == 1 or not self.batched:
            for active in batch:
                step(self.model, active.sequence)
        else:
            self.batched_steps += 1
            batched_step(self.model, [a.sequence for a in batch])
        self.step_seconds.append(time.perf_counter() - started)

    def _guarded(self, group: list[_Active], work: Callable[[], None]) -> None:
        """Run `work`; a failure fails the sequences it touched, not the worker."""
        try:
            work()
        except Exception as e:
            logger.exception("generation failed")
            for active in group:
                self._active.remove(active)
                active.on_done(e)

    def _finish(self, active: _Active) -> None:
        self._active.remove(active)
        try:
            completion = active.sequence.finish()
        except Exception as e:  # noqa: BLE001
            active.on_done(e)
            return
        active.on_done(completion)

    def _drain_active(self) -> None:
        for active in list(self._active):
            active.sequence.finish_reason = active.sequence.finish_reason or "cancelled"
            self._finish(active)

    def _die(self, error: BaseException) -> None:
        self._dead = error
        for active in list(self._active):
            active.on_done(WorkerDead(f"the model worker died: {error!r}"))
        self._active.clear()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP:
                job[0].set_exception(WorkerDead(f"the model worker died: {error!r}"))

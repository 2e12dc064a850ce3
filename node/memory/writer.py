"""The checkpoint writer: commits planned saves on its own thread, so disk work never stalls decode.

The MLX worker plans a save (new rows copied out of the caches, the new path of blocks decided)
and hands it over; this thread writes blocks, fsyncs and replaces manifests, in submission order.
A commit that fails (a full disk, say) leaves the previous checkpoint intact; the plan is kept and
retried before that agent's next save, so later saves, which build on it, stay consistent.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable

from node.memory.checkpoint import CheckpointStore, SavePlan

logger = logging.getLogger(__name__)
_STOP = object()
Done = Callable[[float | BaseException], None]


WRITER_NICENESS = 19  # where the idle scheduling class is refused


def lower_priority() -> None:
    """Let this thread run only on CPU time the model thread leaves (Linux schedules threads as
    tasks with their own policy): SCHED_IDLE where allowed, else the lowest nice value. A
    checkpoint may wait a little; a decode step should not (on 2 cores a nice-10 writer without
    pacing raised the decode step's p99 1.57x, docs/benchmarks.md)."""
    tid = threading.get_native_id()
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        return
    except (AttributeError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, tid, WRITER_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not permitted: same priority as the rest
        pass


class Pacer:
    """While the model is busy, block writes keep to a duty cycle: after a block that took t
    seconds, the next one starts no sooner than YIELD_FACTOR * t later (at most MAX_REST_S), so
    the disk's bursts (page-cache copies, writeback) stay short and rare beside the decode steps.
    A lone small checkpoint (a task's append, one block) after a pause is written at once, and
    with the model idle nothing waits."""

    YIELD_FACTOR = 9.0  # the writer busy at most a tenth of the time while sequences are in flight
    MAX_REST_S = 0.5

    def __init__(self, model_busy: Callable[[], bool] | None) -> None:
        self.model_busy = model_busy
        self._resume_at = 0.0

    def before_block(self) -> None:
        wait = self._resume_at - time.monotonic()
        if wait > 0 and self.model_busy is not None and self.model_busy():
            time.sleep(wait)

    def after_block(self, seconds: float) -> None:
        self._resume_at = time.monotonic() + min(seconds * self.YIELD_FACTOR, self.MAX_REST_S)


class CheckpointWriter:
    def __init__(self, store: CheckpointStore, model_busy: Callable[[], bool] | None = None) -> None:
        self.store = store
        self.pacer = Pacer(model_busy)
        self._queue: queue.Queue = queue.Queue()
        self._pending: defaultdict[str, int] = defaultdict(int)
        self._failed: defaultdict[str, list[SavePlan]] = defaultdict(list)
        self._changed = threading.Condition()
        self.committed = 0
        self.failures = 0
        self.bytes_written = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def submit(self, plan: SavePlan, on_done: Done | None = None) -> None:
        with self._changed:
            self._pending[plan.agent_id] += 1
        self._queue.put((plan, on_done))

    def wait(self, agent_id: str | None = None, timeout: float | None = None) -> bool:
        """Block until `agent_id`'s queued saves (all saves: None) are committed or have failed."""
        with self._changed:
            return self._changed.wait_for(
                lambda: not (self._pending.get(agent_id, 0) if agent_id else any(self._pending.values())),
                timeout,
            )

    def failing(self, agent_id: str) -> bool:
        return bool(self._failed.get(agent_id))

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    def stats(self) -> dict:
        return {
            "queued": sum(self._pending.values()),
            "committed": self.committed,
            "failures": self.failures,
            "failing_agents": sorted(a for a, plans in self._failed.items() if plans),
            "bytes_written": self.bytes_written,
            "last_error": self.last_error,
        }

    def _loop(self) -> None:
        lower_priority()
        while (item := self._queue.get()) is not _STOP:
            plan, on_done = item
            result = self._commit_in_order(plan)
            with self._changed:
                self._pending[plan.agent_id] -= 1
                if not self._pending[plan.agent_id]:
                    del self._pending[plan.agent_id]
                self._changed.notify_all()
            if on_done is not None:
                on_done(result)

    def _commit_in_order(self, plan: SavePlan) -> float | BaseException:
        started = time.perf_counter()
        backlog = self._failed.pop(plan.agent_id, []) + [plan]
        for i, item in enumerate(backlog):
            try:
                self.bytes_written += self.store.commit(item, pacer=self.pacer)
                self.committed += 1
            except Exception as e:  # noqa: BLE001 - reported, retried with the agent's next save
                self.failures += 1
                self.last_error = f"{plan.agent_id}: {e}"
                self._failed[plan.agent_id] = backlog[i:]
                logger.warning(
                    "checkpoint of agent %r failed (kept in memory, retried later): %s", plan.agent_id, e
                )
                return e
        return time.perf_counter() - started

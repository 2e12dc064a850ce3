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


WRITER_NICENESS = 10


def _lower_priority() -> None:
    """Let this thread yield the CPU to the model thread (Linux schedules threads as tasks: a
    thread's own nice value): a checkpoint may wait a little, a decode step should not."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not permitted: same priority as the rest
        pass


class CheckpointWriter:
    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
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
        _lower_priority()
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
                self.bytes_written += self.store.commit(item)
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

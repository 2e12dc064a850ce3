"""Where the node's A2A agents keep their tasks: in memory, or shared through a database.

Without `--database-url` each agent has its own in-memory task store (the SDK default). With it,
every agent of every node shares one a2a-sdk cluster store (`VersionedDatabaseTaskStore`) and its
event log (`DatabaseTaskEventStream`), so any node can answer GetTask, SubscribeToTask and
CancelTask for a task another node runs: it reads the task's snapshot and tails its events.

In memory, a store keeps at most `max_tasks` finished tasks (`RetainingTaskStore`): past that the
oldest finished ones are deleted, with their push configurations.
"""

from __future__ import annotations

import collections
import logging

from a2a.server.context import ServerCallContext
from a2a.server.tasks import InMemoryTaskStore, PushNotificationConfigStore
from a2a.types import Task, TaskState

logger = logging.getLogger(__name__)
POLL_INTERVAL_S = 0.2
DEFAULT_MAX_TASKS = 1000
TERMINAL_STATES = {
    TaskState.TASK_STATE_COMPLETED,
    TaskState.TASK_STATE_FAILED,
    TaskState.TASK_STATE_CANCELED,
    TaskState.TASK_STATE_REJECTED,
}


class RetainingTaskStore(InMemoryTaskStore):
    """An in-memory task store that forgets the oldest finished tasks beyond `max_tasks`."""

    def __init__(self, max_tasks: int = DEFAULT_MAX_TASKS) -> None:
        super().__init__()
        self.max_tasks = max_tasks
        self.push_configs: PushNotificationConfigStore | None = None
        self._finished: collections.OrderedDict[str, ServerCallContext] = collections.OrderedDict()

    async def save(self, task: Task, context: ServerCallContext) -> None:
        await super().save(task, context)
        if task.status.state in TERMINAL_STATES:
            self._finished[task.id] = context
            self._finished.move_to_end(task.id)
        while len(self._finished) > self.max_tasks:
            task_id, owner = self._finished.popitem(last=False)
            await self.delete(task_id, owner)
            if self.push_configs is not None:
                await self.push_configs.delete_info(task_id, owner)

    @property
    def finished(self) -> int:
        return len(self._finished)


class TaskStores:
    """`handler_stores()` -> the keyword arguments of one request handler's stores."""

    def __init__(self, database_url: str | None = None, max_tasks: int = DEFAULT_MAX_TASKS) -> None:
        self.database_url = database_url
        self.max_tasks = max_tasks
        self._engine = self._store = self._events = None
        if database_url is not None:
            from a2a.server.cluster import DatabaseTaskEventStream, VersionedDatabaseTaskStore
            from sqlalchemy.ext.asyncio import create_async_engine

            self._engine = create_async_engine(database_url, pool_pre_ping=True)
            self._store = VersionedDatabaseTaskStore(self._engine)
            self._events = DatabaseTaskEventStream(self._engine, poll_interval_s=POLL_INTERVAL_S)

    @property
    def shared(self) -> bool:
        return self._store is not None

    def handler_stores(self) -> dict:
        if not self.shared:
            return {"task_store": RetainingTaskStore(self.max_tasks)}
        return {"task_store": self._store, "event_stream": self._events}

    async def initialize(self) -> None:
        if self.shared:
            await self._store.initialize()
            await self._events.initialize()
            logger.info("A2A tasks in %s (shared)", self._engine.dialect.name)

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()

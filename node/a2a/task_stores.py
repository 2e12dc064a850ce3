"""Where the node's A2A agents keep their tasks: in memory, or shared through a database.

Without `--database-url` each agent has its own in-memory task store (the SDK default). With it,
every agent of every node shares one a2a-sdk cluster store (`VersionedDatabaseTaskStore`) and its
event log (`DatabaseTaskEventStream`), so any node can answer GetTask, SubscribeToTask and
CancelTask for a task another node runs: it reads the task's snapshot and tails its events.
"""

from __future__ import annotations

import logging

from a2a.server.tasks import InMemoryTaskStore

logger = logging.getLogger(__name__)
POLL_INTERVAL_S = 0.2


class TaskStores:
    """`handler_stores()` -> the keyword arguments of one request handler's stores."""

    def __init__(self, database_url: str | None = None) -> None:
        self.database_url = database_url
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
            return {"task_store": InMemoryTaskStore()}
        return {"task_store": self._store, "event_stream": self._events}

    async def initialize(self) -> None:
        if self.shared:
            await self._store.initialize()
            await self._events.initialize()
            logger.info("A2A tasks in %s (shared)", self._engine.dialect.name)

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()

"""What `create_app` adds to see and use the node: metrics, the usage ledger, the task observer,
the dashboard and the MCP server, built together because they watch the same tasks.

`observe(manager)` wraps the agent manager so every task is seen; `routes()` are `/metrics`,
`/dashboard/...` and `/mcp`; `running()` is the part of the app's lifespan they need (the MCP
session manager's task group, the connections to the `--mcp-server` servers).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Route

from node.a2a.executor import SkillExecutor, SkillRuntime
from node.config import NodeConfig
from node.mcp.server import build_mcp_server
from node.mcp.tools import skill_tools
from node.server.dashboard import Dashboard
from node.server.metrics import NodeMetrics, RejectionCounter
from node.server.observer import CHAT_LABEL, ObservedManager, TaskObserver
from node.server.usage import UsageLedger

MCP_PATH = "/mcp"


class Observability:
    def __init__(
        self, config: NodeConfig, runtime: SkillRuntime, executors: dict[str, SkillExecutor]
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.metrics = NodeMetrics()
        self.observer = TaskObserver(self.metrics, UsageLedger.open(config.cache_dir))
        self.metrics.state = self._metrics_state
        self.stopping: Callable[[], bool] = lambda: False  # serve() sets it: uvicorn is stopping
        self.dashboard = Dashboard(config, runtime, executors, self.observer, lambda: self.stopping())
        self.mcp = build_mcp_server(runtime, executors)
        mcp_app = self.mcp.streamable_http_app(streamable_http_path=MCP_PATH, host=config.host)
        self._mcp_routes = [r for r in mcp_app.routes if isinstance(r, Route) and r.path == MCP_PATH]

    def observe(self, manager):
        """`manager` with its tasks seen by the observer (None stays None: the node is starting)."""
        if manager is None or isinstance(manager, ObservedManager):
            return manager
        return ObservedManager(manager, self.observer, self.config.skills)

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/metrics", self.metrics.endpoint, methods=["GET"]),
            *self.dashboard.routes(),
            *self._mcp_routes,
        ]

    def middleware(self) -> Middleware:
        return Middleware(RejectionCounter, metrics=self.metrics)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The MCP session manager, and the `--mcp-server` tools for the skills while it runs."""
        async with self.mcp.session_manager.run(), skill_tools(self.runtime, self.config.mcp_servers):
            yield

    async def warmed_up(self) -> None:
        """Keep the skills' start-up prefill as a measurement of this machine's prefill rate."""
        for base in list(self.runtime.base_contexts.values()):
            prefilled = base.tokens - base.restored_tokens
            await asyncio.to_thread(self.observer.ledger.record_prefill, prefilled, base.seconds)

    def _metrics_state(self) -> tuple[dict, dict[str, int], int]:
        manager = self.runtime.manager
        stats = manager.stats() if manager is not None else {}
        labels = (*self.config.skills, CHAT_LABEL)  # every label, so an empty queue reads 0
        return stats, {label: 0 for label in labels} | self.observer.queued(), len(self.observer.tasks)

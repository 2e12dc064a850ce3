"""`python -m node serve`: load the model, start the agent manager, serve the app on uvicorn.

uvicorn handles SIGINT/SIGTERM: it stops accepting requests, lets running ones finish (up to the
grace period), runs the app's shutdown; then every agent is checkpointed by `manager.close()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import uvicorn

from node.config import NodeConfig

GRACEFUL_SHUTDOWN_S = 10
MIN_CONNECTIONS = 128
CONNECTIONS_PER_SLOT = 8


class _Server(uvicorn.Server):
    """After a graceful shutdown uvicorn re-raises the signal that stopped it, and SIGTERM's
    default action would end the process before the agents are checkpointed: record it instead."""

    stop_signals: tuple[int, ...] = ()

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            try:
                yield
            finally:
                self.stop_signals = tuple(self._captured_signals)
                self._captured_signals.clear()


def connection_limit(config: NodeConfig) -> int:
    """Open connections uvicorn serves at once: room for the gate's requests, the streams that
    watch them (subscriptions, dashboards) and cheap calls, but not for unbounded sockets."""
    return max(MIN_CONNECTIONS, CONNECTIONS_PER_SLOT * config.max_pending)


async def serve(config: NodeConfig, progress: Callable[[str], None]) -> int:
    from node.server.app import create_app, start_manager

    config.check_exposure()
    manager = await start_manager(config, progress)
    try:
        app = create_app(config, manager)
        server = _Server(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.port,
                log_level="info",
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                # Connections beyond this get 503 from uvicorn before any of the node's code runs
                # (the admission gate bounds generations; this bounds sockets and idle streams).
                limit_concurrency=connection_limit(config),
            )
        )
        app.state.observability.stopping = lambda: server.should_exit  # the dashboard's streams end
        progress(f"serving {', '.join(config.skills)} at {config.base_url} (cache {config.cache_dir})")
        await server.serve()
        return 0 if server.started else 1
    finally:
        await manager.close()
        progress("agents checkpointed; stopped")

"""`create_app(config)`: the node's Starlette app (A2A agents, /health, /agents, /metrics,
/dashboard, /mcp).

With a `manager`, the caller owns it (and closes it); without one the app loads the model and
starts its own manager at start-up and closes it at shutdown. Either way start-up prefills each
hosted skill's system prompt once, so new conversations start from a cached prefix.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from dataclasses import asdict

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from node.a2a.executor import SkillExecutor, SkillRuntime
from node.a2a.server import build_agents
from node.a2a.task_stores import TaskStores
from node.anthropic.api import anthropic_routes
from node.anthropic.chat import ChatService
from node.config import NodeConfig, disk_budget_for
from node.heap import freeze_long_lived
from node.network.node_network import Network
from node.openai.api import openai_routes
from node.server.guards import (
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    CallerBackend,
    HostCheckMiddleware,
    RequestGate,
)
from node.server.observability import Observability

logger = logging.getLogger(__name__)


def create_app(config: NodeConfig, manager=None) -> Starlette:
    runtime = SkillRuntime(config, manager, gate=RequestGate(config.max_pending))
    stores = TaskStores(config.database_url, config.max_tasks)
    agents = build_agents(config, runtime, stores)
    network = runtime.network = Network(config)
    # the agents held in memory, reported to the registry so follow-ups come back here (issue 16)
    network.hot_contexts = lambda: list(runtime.manager.stats()["agents"]) if runtime.manager else []
    seen = Observability(config, runtime, agents.executors)  # metrics, dashboard, MCP
    runtime.manager = seen.observe(runtime.manager)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        owned = runtime.manager is None
        if owned:
            runtime.manager = seen.observe(await start_manager(config))
        try:
            await stores.initialize()
            async with seen.running():  # first: the skills' instructions describe the MCP tools
                await warm_up(runtime, agents.executors.values())
                await seen.warmed_up()
                await network.start()
                freeze_long_lived()  # what the start built lives as long as the node (`node.heap`)
                yield
        finally:
            runtime.stop_all()
            await runtime.drain()  # every running task writes its terminal state first
            await network.stop()
            await agents.aclose()
            await stores.close()
            if owned:
                await runtime.manager.close()

    # The HTTP APIs' agent index; the admission gate is the node's, shared with A2A.
    chat = ChatService(lambda: runtime.manager, config, gate=runtime.gate)
    routes = [
        Route("/health", _health(runtime), methods=["GET"]),
        Route("/agents", _agents(runtime), methods=["GET"]),
        *anthropic_routes(chat),
        *openai_routes(chat),
        *seen.routes(),
        *network.routes(),
        # Last: the node's HTTP+JSON routes end with a catch-all `/{tenant}/...` mount.
        *agents.routes,
    ]
    middleware = [seen.middleware(), *_middleware(config)]  # outermost: counts every refusal
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.runtime = runtime
    app.state.network = network
    app.state.observability = seen
    return app


async def start_manager(config: NodeConfig, progress=logger.info):
    from node.memory.agents import AgentManager
    from node.model.blas import set_blas_threads
    from node.model.engine import Engine

    set_blas_threads(config.threads)
    engine = await asyncio.to_thread(Engine.load, config.model, progress)
    return await AgentManager.start(
        engine,
        config.cache_dir,
        max_agents=config.max_agents,
        memory_budget_bytes=config.memory_budget_bytes,
        disk_budget_bytes=config.disk_budget_bytes or disk_budget_for(config.cache_dir),
        kv_storage=config.kv_storage,
        block_store=config.block_store,
    )


async def warm_up(runtime: SkillRuntime, executors) -> None:
    for executor in executors:
        executor: SkillExecutor
        base = runtime.base_contexts[executor.skill_id] = await executor.warm_up()
        logger.info(
            "skill %s: base context of %d tokens ready in %.2f s (%d restored from disk)",
            executor.skill_id, base.tokens, base.seconds, base.restored_tokens,
        )  # fmt: skip


def _middleware(config: NodeConfig) -> list[Middleware]:
    # Listed outermost first: a request without the key is refused before its body is read.
    middleware = [
        Middleware(HostCheckMiddleware, names=served_names(config)),
        Middleware(AuthenticationMiddleware, backend=CallerBackend()),
        Middleware(BodyLimitMiddleware, max_bytes=config.max_message_bytes),
    ]
    if config.api_key is not None:
        middleware.insert(1, Middleware(ApiKeyMiddleware, api_key=config.api_key))
    return middleware


def served_names(config: NodeConfig) -> tuple[str, ...]:
    """The Host names the node answers to: its bind address, its public URL's host, the extra ones
    (loopback names are always served)."""
    from urllib.parse import urlsplit

    names = [config.host, urlsplit(config.base_url).hostname or "", *config.allowed_hosts]
    return tuple(name for name in names if name)


def _health(runtime: SkillRuntime):
    async def health(request: Request) -> JSONResponse:
        manager = runtime.manager
        body = {
            "status": "ok" if manager is not None else "starting",
            "model": manager.engine.info.name if manager is not None else None,
            "skills": list(runtime.config.skills),
            "running_tasks": len(runtime.running),
            "base_contexts": {skill: asdict(base) for skill, base in runtime.base_contexts.items()},
        }
        if manager is not None and manager.remote is not None:
            # the shared block store: unreachable -> this node serves from its own disk and retries
            body["block_store"] = manager.remote.status()
            if body["block_store"]["reachable"] is False:
                body["status"] = "degraded"
        return JSONResponse(body, status_code=200 if manager is not None else 503)

    return health


def _agents(runtime: SkillRuntime):
    async def agents(request: Request) -> JSONResponse:
        if runtime.manager is None:
            return JSONResponse({"error": "the node is still starting"}, status_code=503)
        return JSONResponse(runtime.manager.stats())

    return agents

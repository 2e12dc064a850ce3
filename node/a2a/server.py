"""The node's A2A agents: one per hosted skill under /skills/<id>/, plus the node itself at /,
and with `conformance` on, the conformance agent at /conformance (`node.a2a.conformance`).

Each agent is the SDK's stack: a card, a `NodeRequestHandler` with its own task store and push
configuration store, and the JSON-RPC and HTTP+JSON routes (v1.0 and v0.3) at the agent's path.
HTTP+JSON responses pass through `node.a2a.http_json` (the binding's media type and statuses).
Push notifications go through `node.a2a.push` (screened URLs, queued delivery); tasks and push
configs are scoped to the caller that created them (the SDK's owner, `guards.caller_id`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate

import httpx
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes, create_rest_routes
from a2a.server.tasks import InMemoryPushNotificationConfigStore
from a2a.types import AgentCard
from a2a.utils.constants import AGENT_CARD_WELL_KNOWN_PATH
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route

from node.a2a.cards import CONFORMANCE_PATH, conformance_card, current_card, node_card, skill_card, skill_path
from node.a2a.conformance import ConformanceExecutor
from node.a2a.executor import SkillExecutor, SkillRuntime
from node.a2a.handler import NodeRequestHandler, SkillRouter
from node.a2a.http_json import Endpoint, as_specified
from node.a2a.push import QueuedPushSender, push_client, push_url_check
from node.a2a.task_stores import RetainingTaskStore, TaskStores
from node.config import NodeConfig
from node.server.guards import json_only, jsonrpc_error, rest_error

LEGACY_CARD_PATH = "/.well-known/agent.json"
# Cards change only when the node restarts (and the SDK sends an ETag to revalidate against).
CARD_CACHE_CONTROL = "public, max-age=300"
SETTLE_S = 10.0  # at shutdown: how long the tasks' last events may take to be stored


@dataclass
class A2AAgents:
    """Everything the app needs from the A2A side: routes, and what to start and stop."""

    routes: list[BaseRoute]
    handlers: list[NodeRequestHandler]
    executors: dict[str, SkillExecutor]
    push_client: httpx.AsyncClient

    async def aclose(self) -> None:
        await asyncio.gather(*(handler.settle(SETTLE_S) for handler in self.handlers))
        for handler in self.handlers:
            await handler._push_sender.aclose()
            await handler.aclose()
        await self.push_client.aclose()


def default_skill(skills: tuple[str, ...]) -> str:
    from skills import DEFAULT_SKILL

    return DEFAULT_SKILL if DEFAULT_SKILL in skills else skills[0]


def build_agents(config: NodeConfig, runtime: SkillRuntime, stores: TaskStores | None = None) -> A2AAgents:
    from skills import SKILLS

    stores = stores or TaskStores()
    pushes = Pushes(push_client(config.allow_private_peers), push_url_check(config.allow_private_peers))
    secured = config.api_key is not None
    executors = {skill_id: SKILLS[skill_id](runtime) for skill_id in config.skills}
    handlers, skill_routes = [], []
    for skill_id, executor in executors.items():
        card = skill_card(config.base_url, skill_id, secured)
        handler = _handler(executor, card, (skill_id,), pushes, stores, runtime.gate)
        handlers.append(handler)
        skill_routes += _skill_agent_routes(handler, card, skill_path(skill_id))
    if config.conformance:
        card = conformance_card(config.base_url, secured)
        handler = _handler(ConformanceExecutor(), card, (), pushes, stores, needs_text=False)
        handlers.append(handler)
        skill_routes += _skill_agent_routes(handler, card, CONFORMANCE_PATH)
    router = SkillRouter(executors, default_skill(config.skills))
    card = node_card(config.base_url, config.skills, secured)
    node = _handler(router, card, config.skills, pushes, stores, runtime.gate)
    handlers.append(node)
    # The node's HTTP+JSON routes end with a catch-all `/{tenant}` mount: they must come last.
    return A2AAgents(skill_routes + _agent_routes(node, card), handlers, executors, pushes.client)


@dataclass(frozen=True)
class Pushes:
    """What every agent's push sender shares: the client and the URL check."""

    client: httpx.AsyncClient
    url_allowed: Callable


def _handler(
    executor,
    card: AgentCard,
    skills: tuple[str, ...],
    pushes: Pushes,
    stores: TaskStores,
    gate=None,
    needs_text: bool = True,
) -> NodeRequestHandler:
    push_configs = InMemoryPushNotificationConfigStore()
    task_stores = stores.handler_stores()
    if isinstance(task_stores["task_store"], RetainingTaskStore):
        task_stores["task_store"].push_configs = push_configs
    return NodeRequestHandler(
        agent_executor=executor,
        **task_stores,
        agent_card=card,
        push_config_store=push_configs,
        push_sender=QueuedPushSender(pushes.client, push_configs, pushes.url_allowed),
        push_url_validator=pushes.url_allowed,
        skills=skills,
        needs_text=needs_text,
        gate=gate,
    )


def _card_routes(card: AgentCard) -> list[BaseRoute]:
    """The v1.0 card at the well-known path; the card with the v0.3 fields at the legacy one.

    Both say when the card was built (`Last-Modified`): it changes only when the node restarts."""
    built = formatdate(usegmt=True)
    routes = [
        *create_agent_card_routes(
            current_card(card), card_url=AGENT_CARD_WELL_KNOWN_PATH, cache_control=CARD_CACHE_CONTROL
        ),
        *create_agent_card_routes(card, card_url=LEGACY_CARD_PATH, cache_control=CARD_CACHE_CONTROL),
    ]
    return [_wrapped(route, lambda endpoint: _last_modified(endpoint, built)) for route in routes]


def _last_modified(endpoint: Endpoint, built: str) -> Endpoint:
    async def card(request: Request) -> Response:
        response = await endpoint(request)
        response.headers["last-modified"] = built
        return response

    return card


def _jsonrpc_routes(handler: NodeRequestHandler) -> list[BaseRoute]:
    routes = create_jsonrpc_routes(handler, rpc_url="/", enable_v0_3_compat=True)
    return [_json_only(route, jsonrpc_error) for route in routes]


def _rest_routes(handler: NodeRequestHandler) -> list[BaseRoute]:
    routes = create_rest_routes(handler, enable_v0_3_compat=True)
    return [_wrapped(_json_only(route, rest_error), as_specified) for route in routes]


def _json_only(route: BaseRoute, refuse) -> BaseRoute:
    """`route` (or the routes of a mount) with the content-type check on POST."""
    return _wrapped(route, lambda endpoint: json_only(endpoint, refuse), post_only=True)


def _wrapped(route: BaseRoute, wrap: Callable[[Endpoint], Endpoint], post_only: bool = False) -> BaseRoute:
    """`route` (or the routes of a mount) with `wrap` applied to its endpoint (POST ones only)."""
    if isinstance(route, Mount):
        return Mount(route.path, routes=[_wrapped(r, wrap, post_only) for r in route.routes])
    if isinstance(route, Route) and (not post_only or "POST" in (route.methods or ())):
        methods = list(route.methods) if route.methods else None
        return Route(route.path, endpoint=wrap(route.endpoint), methods=methods)
    return route


def _agent_routes(handler: NodeRequestHandler, card: AgentCard) -> list[BaseRoute]:
    """Card, JSON-RPC at `/` and HTTP+JSON below it, relative to the agent's path."""
    return [
        *_card_routes(card),
        *_jsonrpc_routes(handler),
        *_rest_routes(handler),
    ]


def _skill_agent_routes(handler: NodeRequestHandler, card: AgentCard, path: str) -> list[BaseRoute]:
    routes = _agent_routes(handler, card)
    jsonrpc = next(
        r for r in routes if isinstance(r, Route) and r.path == "/" and "POST" in (r.methods or ())
    )
    # JSON-RPC clients post to the card's URL; accept it with and without the trailing slash.
    return [Route(path, endpoint=jsonrpc.endpoint, methods=["POST"]), Mount(path, routes=routes)]

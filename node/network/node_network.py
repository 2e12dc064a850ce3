"""The node's place in a network: the registry it may serve, its membership, its delegator.

`Network` is built with the app (the registry's routes must exist before start-up) and started
and stopped by the app's lifespan. The coordination skill delegates through `network.delegator`.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from node.config import NodeConfig
from node.network.context_holders import ask_registry
from node.network.membership import Membership
from node.network.outbound import outbound_client
from node.network.peers import Delegator, PeerClient, PeerDirectory
from node.network.registry import Registry
from node.network.registry_store import RegistryStore


class Network:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.registry: Registry | None = None
        if config.registry:
            store = RegistryStore.open(config.database_url, config.cache_dir)
            self.registry = Registry(store, config)
        self.http: httpx.AsyncClient | None = None
        self.membership: Membership | None = None
        self.delegator: Delegator | None = None
        # agent ids this node holds in memory, reported with each heartbeat (set by the app)
        self.hot_contexts: Callable[[], list[str]] = list

    def routes(self) -> list[BaseRoute]:
        own = [Route("/contexts/{context_id}", self._context_route, methods=["GET"])]
        return (self.registry.routes() if self.registry is not None else []) + own

    async def _context_route(self, request: Request) -> JSONResponse:
        """GET /contexts/{contextId}?skill=ID: which node a follow-up in that A2A context should go
        to (the node holding it hot while alive, else any live node with the skill)."""
        from node.a2a.conversation import conversation_agent_id

        skill = request.query_params.get("skill") or self.config.skills[0]
        context_id = request.path_params["context_id"]
        agent_id = conversation_agent_id(skill, context_id)
        if self.registry is not None:
            found = await self.registry.contexts.route(agent_id, skill)
        elif self.config.registry_url is not None:
            try:
                found = await ask_registry(self.http, self.config.registry_url, agent_id, skill)
            except (httpx.HTTPError, ValueError) as e:
                return JSONResponse({"error": f"registry unreachable: {e}"}, status_code=502)
        else:  # no network: this node, if it hosts the skill
            mine = skill in self.config.skills
            here = agent_id in self.hot_contexts()
            found = {"agent_id": agent_id, "holder": self.config.base_url if here else None, "alive": here,
                     "route_to": self.config.base_url if mine else None, "members": []}  # fmt: skip
        return JSONResponse({"context_id": context_id, "skill": skill, **found})

    async def start(self) -> None:
        # Never the node's own key: each destination gets only the credential meant for it.
        self.http = outbound_client(self.config)
        if self.registry is not None:
            await self.registry.start()
        if self.config.registry_url is not None:
            self.membership = Membership(self.config, self.config.registry_url, self.http)
            self.membership.hot_contexts = lambda: self.hot_contexts()
            await self.membership.start()
        directory = PeerDirectory(self.config, self.http)
        client = PeerClient(self.http, self.config.peer_timeout_s)
        self.delegator = Delegator(directory, client, self.config.delegation_timeout_s)

    async def stop(self) -> None:
        if self.membership is not None:
            await self.membership.stop()
        if self.registry is not None:
            await self.registry.stop()
        if self.http is not None:
            await self.http.aclose()

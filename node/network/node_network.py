"""The node's place in a network: the registry it may serve, its membership, its delegator.

`Network` is built with the app (the registry's routes must exist before start-up) and started
and stopped by the app's lifespan. The coordination skill delegates through `network.delegator`.
"""

from __future__ import annotations

import httpx
from starlette.routing import BaseRoute

from node.config import NodeConfig
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

    def routes(self) -> list[BaseRoute]:
        return self.registry.routes() if self.registry is not None else []

    async def start(self) -> None:
        # Never the node's own key: each destination gets only the credential meant for it.
        self.http = outbound_client(self.config)
        if self.registry is not None:
            await self.registry.start()
        if self.config.registry_url is not None:
            self.membership = Membership(self.config, self.config.registry_url, self.http)
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

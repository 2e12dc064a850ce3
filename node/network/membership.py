"""`serve --join URL` (and `--registry`): keep this node registered with the network's registry.

The node registers its URL, card URL and skills, then repeats the registration every
`heartbeat_s` as its heartbeat; the registry forgets it `MISSED_BEATS` heartbeats after the last
one. Until the registry answers (it may still be starting, or be the node itself, whose server
starts listening only after start-up) the node retries every second. At shutdown it leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx
from a2a.utils.constants import AGENT_CARD_WELL_KNOWN_PATH

from node.config import NodeConfig
from node.network.registry import REGISTRY_PATH

logger = logging.getLogger(__name__)
MISSED_BEATS = 3
RETRY_S = 1.0
LEAVE_TIMEOUT_S = 2.0
BEAT_TIMEOUT_S = 5.0
WARN_AFTER_FAILURES = 10


class Membership:
    def __init__(self, config: NodeConfig, registry_url: str, http: httpx.AsyncClient) -> None:
        self.config = config
        self.endpoint = registry_url.rstrip("/") + REGISTRY_PATH
        self.http = http
        self.registered = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.hot_contexts = list  # agent ids this node holds in memory (the registry routes to it)

    def registration(self) -> dict:
        url = self.config.base_url
        return {
            "url": url,
            "card_url": url + AGENT_CARD_WELL_KNOWN_PATH,
            "skills": list(self.config.skills),
            "ttl_s": MISSED_BEATS * self.config.heartbeat_s,
            "contexts": list(self.hot_contexts()),
        }

    async def start(self) -> None:
        self._task = asyncio.create_task(self._beat_forever(), name="membership-heartbeat")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.registered.is_set():
            with contextlib.suppress(httpx.HTTPError):
                await self.http.delete(
                    self.endpoint, params={"url": self.config.base_url}, timeout=LEAVE_TIMEOUT_S
                )

    async def beat(self) -> None:
        response = await self.http.post(self.endpoint, json=self.registration(), timeout=BEAT_TIMEOUT_S)
        response.raise_for_status()

    async def _beat_forever(self) -> None:
        failures = 0
        while True:
            try:
                await self.beat()
            except httpx.HTTPError as e:
                failures += 1
                # Quiet while the registry may still be starting; loud when a live link breaks.
                if self.registered.is_set() or failures == WARN_AFTER_FAILURES:
                    logger.warning("registry %s unreachable: %s", self.endpoint, e or type(e).__name__)
                self.registered.clear()
            else:
                if not self.registered.is_set():
                    logger.info("registered with %s as %s", self.endpoint, self.config.base_url)
                failures = 0
                self.registered.set()
            await asyncio.sleep(self.config.heartbeat_s if self.registered.is_set() else RETRY_S)

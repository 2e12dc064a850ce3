"""The network registry a node serves with `--registry`: members register, heartbeat and expire.

    POST   /registry/nodes            {"url", "card_url", "skills": [...], "ttl_s"}  register / heartbeat
    GET    /registry/nodes?skill=ID   live members (oldest first), those hosting the skill if given
    DELETE /registry/nodes?url=URL    leave

A member's registration lives `ttl_s` seconds after its last heartbeat; a sweeper deletes the stale
ones (and `GET` never lists them, swept or not).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from urllib.parse import urlparse

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from node.errors import InvalidRegistration
from node.network.registry_store import RegistryStore
from node.server.guards import BodyTooLarge, read_body

logger = logging.getLogger(__name__)
REGISTRY_PATH = "/registry/nodes"
MAX_TTL_S = 3600.0


class Registry:
    def __init__(self, store: RegistryStore, sweep_s: float, max_body_bytes: int) -> None:
        self.store = store
        self.sweep_s = sweep_s
        self.max_body_bytes = max_body_bytes
        self._sweeper: asyncio.Task | None = None

    async def start(self) -> None:
        await self.store.initialize()
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="registry-sweeper")
        logger.info("registry: members in %s", self.store.backend)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.store.close()

    def routes(self) -> list[Route]:
        return [Route(REGISTRY_PATH, self._endpoint, methods=["GET", "POST", "DELETE"])]

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_s)
            try:
                for url in await self.store.expire():
                    logger.info("registry: %s expired (no heartbeat)", url)
            except Exception:
                logger.exception("registry: sweep failed")

    async def _endpoint(self, request: Request) -> JSONResponse:
        handlers = {"GET": self._list, "POST": self._register, "DELETE": self._leave}
        return await handlers[request.method](request)

    async def _list(self, request: Request) -> JSONResponse:
        members = await self.store.members(request.query_params.get("skill"))
        return JSONResponse({"backend": self.store.backend, "members": [m.as_dict() for m in members]})

    async def _register(self, request: Request) -> JSONResponse:
        try:
            body = json.loads(await read_body(request, self.max_body_bytes))
            url, card_url, skills, ttl_s = _registration(body)
        except BodyTooLarge as e:
            return JSONResponse({"error": f"bad registration: {e}"}, status_code=413)
        except (InvalidRegistration, ValueError) as e:
            return JSONResponse({"error": f"bad registration: {e}"}, status_code=400)
        member = await self.store.register(url, card_url, skills, ttl_s)
        if member.registered_at == member.last_seen:
            logger.info("registry: %s joined with %s", url, ", ".join(skills))
        return JSONResponse({"backend": self.store.backend, "member": member.as_dict()})

    async def _leave(self, request: Request) -> JSONResponse:
        url = request.query_params.get("url", "").rstrip("/")
        removed = await self.store.remove(url)
        if removed:
            logger.info("registry: %s left", url)
        return JSONResponse({"removed": removed})


def _registration(body) -> tuple[str, str, tuple[str, ...], float]:
    if not isinstance(body, dict):
        raise InvalidRegistration("expected a JSON object")
    url = _http_url(body.get("url"), "url").rstrip("/")
    card_url = _http_url(body.get("card_url") or f"{url}/.well-known/agent-card.json", "card_url")
    skills = body.get("skills")
    if not isinstance(skills, list) or not all(isinstance(s, str) and s and "," not in s for s in skills):
        raise InvalidRegistration("skills must be a list of skill ids")
    ttl_s = body.get("ttl_s", 30.0)
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not 0 < ttl_s <= MAX_TTL_S:
        raise InvalidRegistration(f"ttl_s must be in (0, {MAX_TTL_S:g}]")
    return url, card_url, tuple(skills), float(ttl_s)


def _http_url(value, name: str) -> str:
    if not isinstance(value, str) or urlparse(value).scheme not in ("http", "https") or len(value) > 500:
        raise InvalidRegistration(f"{name} must be an http(s) URL")
    return value

"""The network registry a node serves with `--registry`: members register, heartbeat and expire.

    POST   /registry/nodes            {"url", "card_url", "skills": [...], "ttl_s"}  register / heartbeat
    GET    /registry/nodes?skill=ID   live members (oldest first), those hosting the skill if given
    DELETE /registry/nodes?url=URL    leave

A member's registration lives `ttl_s` seconds after its last heartbeat; a sweeper deletes the stale
ones (and `GET` never lists them, swept or not).

Who may do what: with `--network-key`, registering, beating and leaving need it (as a bearer token
or `X-API-Key`); without one, the node's `--api-key` guards them. Listing needs either key. A
registration is taken only after the registry has fetched the card at the registered URL (same
origin, through the node's guarded outbound client: no private or metadata addresses) and found
every registered skill on it and every interface it declares at that origin, so a member cannot
point the network's traffic at someone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from urllib.parse import urlparse

import httpx
from a2a.client.card_resolver import parse_agent_card
from google.protobuf.json_format import ParseError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from node.config import NodeConfig
from node.errors import InvalidRegistration
from node.network.context_holders import ContextHolders, registry_routes
from node.network.outbound import origin, outbound_client
from node.network.registry_store import RegistryStore
from node.server.guards import BodyTooLarge, Unauthorized, has_key, read_body, require_json

logger = logging.getLogger(__name__)
REGISTRY_PATH = "/registry/nodes"
MAX_TTL_S = 3600.0
CARD_TIMEOUT_S = 5.0
REVERIFY_S = 300.0  # a heartbeat re-fetches the member's card at most this often


class Registry:
    def __init__(self, store: RegistryStore, config: NodeConfig) -> None:
        self.store = store
        self.config = config
        self.sweep_s = config.heartbeat_s
        self.max_body_bytes = config.max_message_bytes
        self.write_key = config.network_key or config.api_key
        self._verified: dict[tuple[str, str, tuple[str, ...]], float] = {}
        self.contexts = ContextHolders(store)  # which member holds which context hot
        self._http: httpx.AsyncClient | None = None
        self._sweeper: asyncio.Task | None = None

    async def start(self) -> None:
        self._http = outbound_client(self.config, CARD_TIMEOUT_S)
        await self.store.initialize()
        await self.contexts.initialize()
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="registry-sweeper")
        logger.info("registry: members in %s", self.store.backend)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._http is not None:
            await self._http.aclose()
        await self.store.close()

    def routes(self) -> list[Route]:
        return [
            Route(REGISTRY_PATH, self._endpoint, methods=["GET", "POST", "DELETE"]),
            *registry_routes(self.contexts, self._may_read),
        ]

    def _may_read(self, request: Request) -> bool:
        readers = (self.config.network_key, self.config.api_key)
        return not any(readers) or any(key and has_key(request.headers, key) for key in readers)

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
        if request.method == "GET":
            allowed = self._may_read(request)
        else:
            allowed = has_key(request.headers, self.write_key)
        if not allowed:
            logger.info("registry: refused %s from %s: no network key", request.method, _client(request))
            return JSONResponse({"error": "missing or invalid network key"}, status_code=Unauthorized.status)
        return await handlers[request.method](request)

    async def _list(self, request: Request) -> JSONResponse:
        members = await self.store.members(request.query_params.get("skill"))
        return JSONResponse({"backend": self.store.backend, "members": [m.as_dict() for m in members]})

    async def _register(self, request: Request) -> JSONResponse:
        try:
            require_json(request.headers)
            body = json.loads(await read_body(request, self.max_body_bytes))
            url, card_url, skills, ttl_s = _registration(body)
            await self.verify(url, card_url, skills)
        except BodyTooLarge as e:
            return JSONResponse({"error": f"bad registration: {e}"}, status_code=413)
        except (InvalidRegistration, ValueError) as e:
            return JSONResponse({"error": f"bad registration: {e}"}, status_code=400)
        member = await self.store.register(url, card_url, skills, ttl_s)
        if "contexts" in body and isinstance(body["contexts"], list):
            await self.contexts.report(url, body["contexts"])
        if member.registered_at == member.last_seen:
            logger.info("registry: %s joined with %s", url, ", ".join(skills))
        return JSONResponse({"backend": self.store.backend, "member": member.as_dict()})

    async def _leave(self, request: Request) -> JSONResponse:
        url = request.query_params.get("url", "").rstrip("/")
        removed = await self.store.remove(url)
        if removed:
            logger.info("registry: %s left", url)
        return JSONResponse({"removed": removed})

    async def verify(self, url: str, card_url: str, skills: tuple[str, ...]) -> None:
        """Raise InvalidRegistration unless the card at `card_url` vouches for this registration."""
        key = (url, card_url, skills)
        if time.monotonic() - self._verified.get(key, -REVERIFY_S) < REVERIFY_S:
            return
        if origin(card_url) != origin(url):
            raise InvalidRegistration(f"card_url {card_url} is not at the member's origin {origin(url)}")
        try:
            response = await self._http.get(card_url)
            response.raise_for_status()
            card = parse_agent_card(response.json())
        except (httpx.HTTPError, ValueError, TypeError, AttributeError, ParseError) as e:
            raise InvalidRegistration(
                f"no agent card at {card_url}: {str(e)[:200] or type(e).__name__}"
            ) from e
        missing = set(skills) - {skill.id for skill in card.skills}
        if missing:
            raise InvalidRegistration(f"the card at {card_url} does not list {', '.join(sorted(missing))}")
        elsewhere = [i.url for i in card.supported_interfaces if origin(i.url) != origin(url)]
        if elsewhere:
            raise InvalidRegistration(f"the card's interfaces {elsewhere} are not at {origin(url)}")
        self._verified = {k: t for k, t in self._verified.items() if k[0] != url}  # one entry per member
        self._verified[key] = time.monotonic()


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


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

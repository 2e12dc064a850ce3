"""`/dashboard`: one page that shows the node and updates itself, plus the endpoints it reads.

- `GET /dashboard`: the page (`static/dashboard.html`, plain HTML/CSS/JS: no build step, nothing
  fetched from elsewhere, so it works on an offline node);
- `GET /dashboard/state`: the node's state as JSON (contexts, budgets, time saved, live tasks,
  the network's members); `GET /dashboard/events`: the same as server-sent events, sent whenever a
  task starts, moves on or ends (at most every `MIN_INTERVAL_S`) and every `HEARTBEAT_S` anyway;
- `POST /dashboard/ask` `{"skill", "question", "context_id"?}`: one turn with a skill.

With an API key set, every dashboard request needs it: as a header like the other APIs, or as the
cookie that logging in sets (a browser cannot add headers to a page or an EventSource): without it
`/dashboard` answers with a form that posts the key to `/dashboard/login`. The guards leave
`/dashboard` to this module (`SELF_CHECKING_PREFIXES`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs

import httpx
from a2a.utils.constants import AGENT_CARD_WELL_KNOWN_PATH
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from node.a2a.executor import SkillExecutor, SkillRuntime
from node.a2a.skill_calls import SkillCallError, ask_skill, contexts, find_executor
from node.config import NodeConfig
from node.errors import NodeError
from node.network.registry import REGISTRY_PATH
from node.server.guards import BodyTooLarge, Overloaded, has_key, read_body
from node.server.observer import TaskObserver

logger = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
KEY_COOKIE = "node_api_key"
LOGIN_MAX_BYTES = 4096
MIN_INTERVAL_S = 0.3
HEARTBEAT_S = 2.0
STOP_POLL_S = 0.5  # how soon an event stream ends once the server is stopping
MEMBERS_TTL_S = 5.0
LISTING_TTL_S = 1.0  # the contexts' listing reads the checkpoint folder: at most once a second
LOOKUP_TIMEOUT_S = 2.0


class Dashboard:
    def __init__(
        self,
        config: NodeConfig,
        runtime: SkillRuntime,
        executors: dict[str, SkillExecutor],
        observer: TaskObserver,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.config = config
        self.stopping = stopping
        self.runtime = runtime
        self.executors = executors
        self.observer = observer
        self._members: tuple[float, list[dict]] = (0.0, [])
        self._listing: tuple[float, dict, list[dict]] = (0.0, {}, [])

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/dashboard", self._guarded(self.page), methods=["GET"]),
            Route("/dashboard/state", self._guarded(self.state_endpoint), methods=["GET"]),
            Route("/dashboard/events", self._guarded(self.events), methods=["GET"]),
            Route("/dashboard/ask", self._guarded(self.ask), methods=["POST"]),
            Route("/dashboard/static/{name}", self._guarded(self.static), methods=["GET"]),
            Route("/dashboard/login", self.login, methods=["POST"]),
        ]

    # ---- the key ---------------------------------------------------------------------------
    def _guarded(self, endpoint):
        async def guarded(request: Request) -> Response:
            key = self.config.api_key
            if key is None or has_key(request.headers, key) or _same(request.cookies.get(KEY_COOKIE), key):
                return await endpoint(request)
            if request.url.path == "/dashboard":  # a browser: the page asks for the key
                return FileResponse(STATIC / "login.html", status_code=401, media_type="text/html")
            return JSONResponse(
                {"error": "missing or invalid API key: log in at /dashboard, or send the key header"},
                status_code=401,
            )

        return guarded

    async def login(self, request: Request) -> Response:
        """The login form's POST (a form field, not the URL: access logs record URLs)."""
        key = self.config.api_key
        try:
            form = parse_qs((await read_body(request, LOGIN_MAX_BYTES)).decode("utf-8", "replace"))
        except BodyTooLarge as e:
            return JSONResponse({"error": e.message}, status_code=413)
        offered = (form.get("key") or [""])[0]
        if key is not None and not _same(offered, key):
            return FileResponse(STATIC / "login.html", status_code=401, media_type="text/html")
        response = RedirectResponse("/dashboard", status_code=303)
        if key is not None:
            response.set_cookie(KEY_COOKIE, offered, httponly=True, samesite="strict", path="/dashboard")
        return response

    # ---- endpoints -------------------------------------------------------------------------
    async def page(self, request: Request) -> Response:
        return FileResponse(STATIC / "dashboard.html", media_type="text/html")

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_FILES:
            return Response(status_code=404)
        return FileResponse(STATIC / name, media_type=STATIC_FILES[name])

    async def state_endpoint(self, request: Request) -> Response:
        return JSONResponse(await self.state())

    async def events(self, request: Request) -> Response:
        async def stream():
            # Ends when the server stops: an open stream would hold its graceful shutdown.
            version, sent_at = -1, 0.0
            while not self.stopping():
                current = await self.observer.changed(version, STOP_POLL_S)
                if current == version and time.monotonic() - sent_at < HEARTBEAT_S:
                    continue
                version, sent_at = current, time.monotonic()
                yield f"event: state\ndata: {json.dumps(await self.state())}\n\n"
                await asyncio.sleep(MIN_INTERVAL_S)  # a burst of changes (one per token) is one event

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def ask(self, request: Request) -> Response:
        try:
            body = json.loads(await read_body(request, self.config.max_message_bytes))
            executor = find_executor(self.executors, str(body.get("skill", "")))
            answer = await ask_skill(
                self.runtime, executor, str(body.get("question", "")), body.get("context_id") or None
            )
        except BodyTooLarge as e:
            return JSONResponse({"error": e.message}, status_code=413)
        except Overloaded as e:
            return JSONResponse({"error": e.message}, status_code=503, headers={"Retry-After": "2"})
        except (ValueError, AttributeError, SkillCallError) as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except NodeError as e:
            return JSONResponse({"error": str(e)}, status_code=503)
        return JSONResponse(
            {
                "skill": answer.skill,
                "context_id": answer.context_id,
                "answer": answer.text,
                "finish_reason": answer.finish_reason,
                "usage": answer.usage,
                "reports": list(answer.reports),
            }
        )

    # ---- the state -------------------------------------------------------------------------
    async def state(self) -> dict:
        manager = self.runtime.manager
        node = {
            "url": self.config.base_url,
            "skills": list(self.config.skills),
            "status": "starting" if manager is None else "ok",
            "time": time.time(),
        }
        if manager is None:
            return {"node": node}
        stats, rows = await self._listed(manager)
        node["model"] = stats.get("model")
        disk = stats.get("on_disk") or {}
        return {
            "node": node,
            "memory": {
                "bytes": stats.get("bytes_in_memory", 0),
                "budget_bytes": stats.get("memory_budget_bytes"),
                "agents": stats.get("agents_in_memory", 0),
                "max_agents": stats.get("max_agents"),
                "tokens": stats.get("tokens_cached", 0),
            },
            "disk": {
                "bytes": disk.get("bytes", 0),
                "budget_bytes": disk.get("disk_budget_bytes"),
                "agents": disk.get("agents", 0),
                "tokens": disk.get("tokens", 0),
            },
            "saved": {
                **self.observer.ledger.summary(),
                "in_memory_now": {
                    "prefill_tokens_avoided": stats.get("prefill_tokens_avoided", 0),
                    "seconds_saved": stats.get("seconds_saved", 0.0),
                },
            },
            "contexts": rows,
            "tasks": [task.as_dict() for task in list(self.observer.tasks.values())],
            "network": await self.members(),
            "mcp_tools": self._mcp_tools(),
        }

    def _mcp_tools(self) -> list[dict]:
        """The `--mcp-server` tools the skills may call."""
        tools = self.runtime.tools
        if tools is None:
            return []
        return [
            {"name": s.name, "description": s.description, "server": tools.servers[s.name]}
            for s in tools.specs
        ]

    async def _listed(self, manager) -> tuple[dict, list[dict]]:
        """The manager's stats and the contexts, read again once `LISTING_TTL_S` has passed."""
        read_at, stats, rows = self._listing
        if time.monotonic() - read_at >= LISTING_TTL_S:
            skills = self.config.skills
            stats, rows = await asyncio.to_thread(lambda: (manager.stats(), contexts(manager, skills)))
            self._listing = (time.monotonic(), stats, rows)
        return stats, rows

    async def members(self) -> list[dict]:
        """This node, the registry's members and `--peer` nodes with their skills (cached briefly)."""
        fetched_at, found = self._members
        if time.monotonic() - fetched_at < MEMBERS_TTL_S:
            return found
        me = self.config.base_url
        found = [{"url": me, "skills": list(self.config.skills), "via": "this node"}]
        network = self.runtime.network
        http = network.http if network is not None else None
        if http is not None:
            found += await self._registry_members(http) + await self._peer_members(http)
        seen, unique = set(), []
        for member in found:  # the first listing of a URL wins: this node, then the registry's
            if member["url"].rstrip("/") not in seen:
                seen.add(member["url"].rstrip("/"))
                unique.append(member)
        self._members = (time.monotonic(), unique)
        return unique

    async def _registry_members(self, http: httpx.AsyncClient) -> list[dict]:
        registry = self.config.registry_url
        if registry is None:
            return []
        try:
            response = await http.get(registry + REGISTRY_PATH, timeout=LOOKUP_TIMEOUT_S)
            response.raise_for_status()
            listed = response.json()["members"]
        except (httpx.HTTPError, ValueError, KeyError) as e:
            logger.info("dashboard: registry %s unavailable: %s", registry, e)
            return []
        return [
            {
                "url": m["url"],
                "skills": m.get("skills", []),
                "via": "registry",
                "last_seen": m.get("last_seen"),
            }
            for m in listed
            if m.get("url") != self.config.base_url
        ]

    async def _peer_members(self, http: httpx.AsyncClient) -> list[dict]:
        found = []
        for peer in self.config.peers:
            try:
                response = await http.get(peer + AGENT_CARD_WELL_KNOWN_PATH, timeout=LOOKUP_TIMEOUT_S)
                response.raise_for_status()
                skills = [s["id"] for s in response.json().get("skills", [])]
            except (httpx.HTTPError, ValueError, KeyError):
                skills = None  # unreachable: listed without skills
            found.append({"url": peer, "skills": skills, "via": "--peer"})
        return found


def _same(offered: str | None, key: str) -> bool:
    return offered is not None and hmac.compare_digest(offered.encode(), key.encode())

"""Which node holds a context hot (in memory), so a follow-up goes back to it while it is alive.

Members report the agents they hold in memory with every heartbeat (`contexts` in the
registration); the registry keeps, per agent id, the member that reported it last, in the same
database as the members (SQLite or PostgreSQL):

    GET /registry/contexts/{agent_id}?skill=ID   {"holder", "alive", "route_to", "members"}

`route_to` is the holder while it is a live member, else the oldest live member hosting the skill:
that node pulls the context's blocks from the shared block store and resumes it. Every node answers
`GET /contexts/{context_id}?skill=ID` (an A2A contextId) by asking its registry the same question.
"""

from __future__ import annotations

import logging
import time

import httpx
from sqlalchemy import Column, Float, MetaData, String, Table, delete, select
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from node.errors import InvalidAgentId
from node.memory.agent_ids import validate_agent_id
from node.network.registry_store import RegistryStore

logger = logging.getLogger(__name__)
CONTEXTS_PATH = "/registry/contexts"
MAX_REPORTED = 2000
LOOKUP_TIMEOUT_S = 5.0

metadata = MetaData()
holders_table = Table(
    "node_context_holders",
    metadata,
    Column("agent_id", String(128), primary_key=True),
    Column("url", String(512), nullable=False, index=True),
    Column("reported_at", Float, nullable=False),
)


class ContextHolders:
    def __init__(self, store: RegistryStore) -> None:
        self.store = store

    async def initialize(self) -> None:
        async with self.store.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)

    async def report(self, url: str, agent_ids, now: float | None = None) -> int:
        """`url` holds exactly `agent_ids` now (its earlier report is replaced)."""
        now = time.time() if now is None else now
        ids = list(dict.fromkeys(a for a in agent_ids or () if _valid(a)))[:MAX_REPORTED]
        async with self.store.engine.begin() as conn:
            await conn.execute(delete(holders_table).where(holders_table.c.url == url))
            if ids:
                await conn.execute(delete(holders_table).where(holders_table.c.agent_id.in_(ids)))
                await conn.execute(
                    holders_table.insert(), [{"agent_id": a, "url": url, "reported_at": now} for a in ids]
                )
        return len(ids)

    async def holder(self, agent_id: str) -> str | None:
        query = select(holders_table.c.url).where(holders_table.c.agent_id == agent_id)
        async with self.store.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else row.url

    async def route(self, agent_id: str, skill: str | None) -> dict:
        """Where a follow-up for `agent_id` should go: its holder while alive, else a live member."""
        holder = await self.holder(agent_id)
        members = [m.url for m in await self.store.members(skill)]
        alive = holder is not None and holder in members
        return {
            "agent_id": agent_id,
            "holder": holder,
            "alive": alive,
            "route_to": holder if alive else (members[0] if members else None),
            "members": members,
        }


def _valid(agent_id) -> bool:
    try:
        validate_agent_id(agent_id)
    except InvalidAgentId:
        return False
    return True


def registry_routes(holders: ContextHolders, allowed) -> list[Route]:
    """The registry's lookup; `allowed(request)` is the registry's read check."""

    async def lookup(request: Request) -> JSONResponse:
        if not allowed(request):
            return JSONResponse({"error": "missing or invalid network key"}, status_code=401)
        agent_id = request.path_params["agent_id"]
        if not _valid(agent_id):
            return JSONResponse({"error": f"invalid agent id {agent_id!r}"}, status_code=400)
        return JSONResponse(await holders.route(agent_id, request.query_params.get("skill")))

    return [Route(CONTEXTS_PATH + "/{agent_id}", lookup, methods=["GET"])]


async def ask_registry(http: httpx.AsyncClient, registry_url: str, agent_id: str, skill: str | None) -> dict:
    params = {"skill": skill} if skill else {}
    response = await http.get(
        f"{registry_url}{CONTEXTS_PATH}/{agent_id}", params=params, timeout=LOOKUP_TIMEOUT_S
    )
    response.raise_for_status()
    return response.json()

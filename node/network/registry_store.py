"""The registry's member list, in SQLite (default, under the cache dir) or PostgreSQL.

Both go through SQLAlchemy's async engine (aiosqlite / asyncpg), so one implementation serves
both. A member is a node: its URL, card URL, hosted skills, and how long its registration lives
without a heartbeat (`ttl_s`). Times are the registry's own wall clock, so members on other
machines need no synchronised clocks.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sqlalchemy import Column, Float, MetaData, String, Table, Text, delete, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

SQLITE_FILE = "registry.sqlite"

metadata = MetaData()
members_table = Table(
    "node_members",
    metadata,
    Column("url", String(512), primary_key=True),
    Column("card_url", String(600), nullable=False),
    Column("skills", Text, nullable=False),  # comma-separated skill ids
    Column("ttl_s", Float, nullable=False),
    Column("registered_at", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
)


@dataclass(frozen=True)
class Member:
    url: str
    card_url: str
    skills: tuple[str, ...]
    ttl_s: float
    registered_at: float
    last_seen: float

    def expired(self, now: float) -> bool:
        return now - self.last_seen > self.ttl_s

    def as_dict(self) -> dict:
        return {**asdict(self), "skills": list(self.skills)}

    @classmethod
    def from_row(cls, row) -> Member:
        skills = tuple(s for s in row.skills.split(",") if s)
        return cls(row.url, row.card_url, skills, row.ttl_s, row.registered_at, row.last_seen)


def sqlite_url(cache_dir: Path) -> str:
    return f"sqlite+aiosqlite:///{Path(cache_dir).resolve() / SQLITE_FILE}"


class RegistryStore:
    """Members by URL; registering again (the heartbeat) refreshes `last_seen` and the skills."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @classmethod
    def open(cls, database_url: str | None, cache_dir: Path) -> RegistryStore:
        if database_url is None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
        return cls(create_async_engine(database_url or sqlite_url(cache_dir)))

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    async def initialize(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)

    async def close(self) -> None:
        await self.engine.dispose()

    async def register(
        self, url: str, card_url: str, skills: tuple[str, ...], ttl_s: float, now: float | None = None
    ) -> Member:
        now = time.time() if now is None else now
        values = {"card_url": card_url, "skills": ",".join(skills), "ttl_s": ttl_s, "last_seen": now}
        statement = self._insert().values(url=url, registered_at=now, **values)
        statement = statement.on_conflict_do_update(index_elements=["url"], set_=values)
        async with self.engine.begin() as conn:
            await conn.execute(statement)
            row = (await conn.execute(select(members_table).where(members_table.c.url == url))).one()
        return Member.from_row(row)

    async def remove(self, url: str) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(delete(members_table).where(members_table.c.url == url))
        return result.rowcount > 0

    async def members(self, skill: str | None = None, now: float | None = None) -> list[Member]:
        """Live members (oldest registration first), those hosting `skill` if given."""
        now = time.time() if now is None else now
        query = select(members_table).order_by(members_table.c.registered_at, members_table.c.url)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        found = [Member.from_row(row) for row in rows]
        return [m for m in found if not m.expired(now) and (skill is None or skill in m.skills)]

    async def expire(self, now: float | None = None) -> list[str]:
        """Delete members whose last heartbeat is older than their ttl; returns their URLs."""
        now = time.time() if now is None else now
        stale = members_table.c.last_seen + members_table.c.ttl_s < now
        async with self.engine.begin() as conn:
            urls = [row.url for row in (await conn.execute(select(members_table.c.url).where(stale))).all()]
            if urls:
                await conn.execute(delete(members_table).where(members_table.c.url.in_(urls)))
        return urls

    def _insert(self):
        if self.backend == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(members_table)

"""PostgreSQL mode: two real nodes share the registry and the A2A task store in one database.

    P1: registry + technical analysis, --database-url
    P2: business analysis + coordination, joins P1, --database-url

A task started on P1 is read (GetTask) and followed (SubscribeToTask) on P2, which does not run it.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from a2a.types import GetTaskRequest, SubscribeToTaskRequest, TaskState

from tests.a2a_node import NodeProcess, a2a_client, http_client, user_message, wait_for_members
from tests.conftest import free_port
from tests.postgres_cluster import postgres_bin, postgres_cluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        postgres_bin() is None, reason="PostgreSQL binaries absent (apt-get install postgresql)"
    ),
]


@pytest.fixture(scope="module")
def database_url():
    with postgres_cluster(free_port()) as url:
        yield url


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, database_url):
    folder = tmp_path_factory.mktemp("pg-nodes")
    # A chunk per token and room for 96: the task streamed on P1 is still running when P2 reads and
    # follows it after the first chunk, however fast this machine decodes.
    common = ("--database-url", database_url, "--heartbeat", "1", "--max-tokens", "96", "--stream-chunk", "0")
    p1 = NodeProcess(free_port(), folder / "p1", "--skills", "technical_analysis", "--registry", *common)
    p1.start()
    p2 = NodeProcess(
        free_port(), folder / "p2", "--skills", "business_analysis,coordination", "--join", p1.url, *common
    )
    try:
        p2.start()
        wait_for_members(p1.url, {p1.url, p2.url})
        yield p1, p2
    finally:
        p2.stop()
        p1.stop()


async def test_registry_members_live_in_postgres(nodes, database_url):
    import asyncpg

    p1, p2 = nodes
    async with http_client() as http:
        listing = (await http.get(f"{p1.url}/registry/nodes")).json()
    assert listing["backend"] == "postgresql"
    dsn = database_url.replace("postgresql+asyncpg", "postgresql")
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch("SELECT url, skills FROM node_members ORDER BY url")
    finally:
        await connection.close()
    assert {r["url"]: r["skills"] for r in rows} == {
        p1.url: "technical_analysis",
        p2.url: "business_analysis,coordination",
    }
    assert not (p1.cache_dir / "registry.sqlite").exists()


async def test_a_task_run_on_one_node_is_read_and_followed_from_another(nodes):
    p1, p2 = nodes
    async with http_client() as http:
        runner = await a2a_client(http, f"{p1.url}/skills/technical_analysis", streaming=True)
        reader = await a2a_client(http, p2.url, streaming=True)
        # a UUID: the SDK's database task store keeps contextIds in 36 characters
        stream = runner.send_message(user_message("Explain write-ahead logging.", str(uuid.uuid4())))
        streamed, task_id = [], None
        async for event in stream:  # up to the first chunk: the task is now WORKING on P1
            if event.HasField("task"):
                task_id = event.task.id
            if event.HasField("artifact_update"):
                streamed.append(event.artifact_update.artifact.parts[0].text)
                break
        seen = await reader.get_task(GetTaskRequest(id=task_id))
        assert seen.status.state == TaskState.TASK_STATE_WORKING
        followed = asyncio.create_task(_collect(reader.subscribe(SubscribeToTaskRequest(id=task_id))))
        async for event in stream:
            if event.HasField("artifact_update"):
                streamed.append(event.artifact_update.artifact.parts[0].text)
        events = await asyncio.wait_for(followed, timeout=120)
        final = await reader.get_task(GetTaskRequest(id=task_id))
        health = (await http.get(f"{p2.url}/health")).json()
    states = [e.status_update.status.state for e in events if e.HasField("status_update")]
    assert events[0].HasField("task") and events[0].task.id == task_id
    assert states[-1] == TaskState.TASK_STATE_COMPLETED
    assert any(e.HasField("artifact_update") for e in events)
    assert final.status.state == TaskState.TASK_STATE_COMPLETED
    assert "".join(p.text for a in final.artifacts for p in a.parts) == "".join(streamed)
    assert health["running_tasks"] == 0  # P2 only read it; P1 ran it


async def _collect(events) -> list:
    return [event async for event in events]

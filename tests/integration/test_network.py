"""A network of three real node processes on loopback: registry, discovery, delegation, failures.

    B: registry + coordination        (the coordinator; members in SQLite under its cache dir)
    A: technical + business analysis  joins B first
    C: technical analysis             joins B after A (so A is the first technical peer)

The tests run in order: the last ones kill A mid-task and watch it expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from a2a.types import GetTaskRequest, TaskState
from google.protobuf.json_format import MessageToDict

from skills.coordination import subtask_context
from tests.a2a_node import (
    NodeProcess,
    a2a_client,
    http_client,
    members,
    metadata_of,
    send,
    wait_for_members,
)
from tests.conftest import free_port

pytestmark = pytest.mark.slow
HEARTBEAT_S = 1.0
# What the kill test's sub-tasks may generate: they must still be running when its 0.2 s poll looks,
# however fast the machine decodes (~1 s at 100 tok/s).
LONG_TASK_TOKENS = 96
REQUEST = "Should we put a cache in front of our product database?"


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    folder = tmp_path_factory.mktemp("network")
    b_port = free_port()
    registry = f"http://127.0.0.1:{b_port}"
    common = ("--heartbeat", str(HEARTBEAT_S), "--max-tokens", str(LONG_TASK_TOKENS))
    b = NodeProcess(b_port, folder / "b", "--skills", "coordination", "--registry", *common)
    a = NodeProcess(
        free_port(),
        folder / "a",
        "--skills",
        "technical_analysis,business_analysis",
        "--join",
        registry,
        *common,
    )
    c = NodeProcess(free_port(), folder / "c", "--skills", "technical_analysis", "--join", registry, *common)
    nodes = {"a": a, "b": b, "c": c}
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(NodeProcess.start, (b, a)))
        wait_for_members(registry, {a.url, b.url})
        c.start()
        wait_for_members(registry, {a.url, b.url, c.url})
        yield nodes
    finally:
        for node in nodes.values():
            node.stop()


def agent_id(skill: str, context_id: str) -> str:
    return f"{skill}.ctx-{hashlib.sha256(context_id.encode()).hexdigest()[:24]}"


def delegation_of(events) -> dict:
    reports = [
        e.artifact_update.artifact
        for e in events
        if e.HasField("artifact_update") and e.artifact_update.artifact.name == "delegation"
    ]
    assert len(reports) == 1, events
    text, data = reports[0].parts
    return {"text": text.text, **MessageToDict(data.data)}


def final_state(events) -> int:
    return [e.status_update.status.state for e in events if e.HasField("status_update")][-1]


# ---- membership ----------------------------------------------------------------------------
def test_registration_and_discovery_by_skill(network):
    a, b, c = network["a"], network["b"], network["c"]
    assert members(b.url, "technical_analysis") == [a.url, c.url]
    assert members(b.url, "business_analysis") == [a.url]
    assert members(b.url, "coordination") == [b.url]
    assert members(b.url, "astrology") == []
    with contextlib.closing(sqlite3.connect(b.cache_dir / "registry.sqlite")) as database:
        stored = {url for (url,) in database.execute("SELECT url FROM node_members")}
    assert stored == {a.url, b.url, c.url}
    bad = httpx.post(f"{b.url}/registry/nodes", json={"url": "not a url", "skills": []}, timeout=10)
    assert bad.status_code == 400


# ---- delegation ----------------------------------------------------------------------------
async def test_coordinator_delegates_across_nodes(network):
    a, b = network["a"], network["b"]
    context_id = f"ctx-{uuid.uuid4()}"
    async with http_client() as http:
        client = await a2a_client(http, b.url, streaming=True)
        events = await send(client, REQUEST, context_id, max_tokens=4)
        a_agents = (await http.get(f"{a.url}/agents")).json()["agents"]
    assert final_state(events) == TaskState.TASK_STATE_COMPLETED
    report = delegation_of(events)
    assert report["missing"] == []
    by_skill = {s["skill"]: s for s in report["subtasks"]}
    assert set(by_skill) == {"technical_analysis", "business_analysis"}
    for skill, subtask in by_skill.items():
        assert subtask["peer"] == a.url and subtask["answered"]
        assert subtask["usage"]["generatedTokens"] == 4
        assert f"answered by {a.url}" in report["text"]
        # The expert's conversation is a persistent agent on A, checkpointed like any other.
        assert agent_id(skill, subtask_context(context_id, skill)) in a_agents
    # The coordinator answered too, in its own persistent context.
    answer = [
        e for e in events if e.HasField("artifact_update") and e.artifact_update.artifact.name == "answer"
    ]
    assert answer
    final = [e.status_update for e in events if e.HasField("status_update")][-1]
    assert metadata_of(final)["usage"]["generatedTokens"] == 4


async def test_a_peer_killed_mid_task_is_retried_elsewhere_and_the_gap_reported(network):
    a, b, c = network["a"], network["b"], network["c"]
    async with http_client() as http:
        client = await a2a_client(http, b.url, streaming=True)
        running = asyncio.create_task(
            send(client, REQUEST, f"ctx-{uuid.uuid4()}", max_tokens=LONG_TASK_TOKENS)
        )
        await wait_until_running(http, a.url, tasks=2)
        a.proc.kill()  # SIGKILL: no graceful shutdown, no leaving the registry
        a.proc.wait()
        a.proc = None
        events = await asyncio.wait_for(running, timeout=600)
        health = (await http.get(f"{b.url}/health")).json()
        task_id = events[0].task.id
        fetched = await (await a2a_client(http, b.url)).get_task(GetTaskRequest(id=task_id))
    assert final_state(events) == TaskState.TASK_STATE_COMPLETED
    assert fetched.status.state == TaskState.TASK_STATE_COMPLETED and health["running_tasks"] == 0
    report = delegation_of(events)
    by_skill = {s["skill"]: s for s in report["subtasks"]}
    assert report["missing"] == ["business_analysis"]
    assert "business_analysis: MISSING" in report["text"]
    assert [t["peer"] for t in by_skill["business_analysis"]["attempts"]] == [a.url]
    technical = by_skill["technical_analysis"]
    assert technical["peer"] == c.url
    assert [(t["peer"], t["outcome"] != "completed") for t in technical["attempts"]] == [
        (a.url, True),
        (c.url, False),
    ]


async def wait_until_running(http: httpx.AsyncClient, url: str, tasks: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (await http.get(f"{url}/health")).json()["running_tasks"] >= tasks:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{url} never ran {tasks} tasks")


def test_a_killed_node_expires_and_a_stopped_one_leaves(network):
    b, c = network["b"], network["c"]
    # A was killed by the previous test: it stops heartbeating and expires after 3 heartbeats.
    wait_for_members(b.url, {b.url, c.url}, timeout_s=20 * HEARTBEAT_S)
    assert c.stop() == 0
    assert members(b.url) == [b.url]
    assert members(b.url, "technical_analysis") == []

"""Issue 17, scenarios 6 and 7 on real nodes (tiny random-weight GGUF): every task ends in a terminal
state with a reason when the node shuts down (here with the task store in a database, as
PostgreSQL keeps it), and a conversation that outgrows the context drops its oldest turns instead
of failing every later turn."""

from __future__ import annotations

import pytest
from a2a.types import GetTaskRequest, SendMessageConfiguration, TaskState

from node.a2a.executor import SHUTDOWN_REASON
from tests.a2a_node import a2a_client, http_client, metadata_of, poll_until, start_tiny_node, user_message
from tests.conftest import free_port
from tests.postgres_cluster import postgres_bin, postgres_cluster

LONG = 20000  # tokens: minutes on the tiny model


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """The shared task store's database: SQLite, and PostgreSQL where its binaries are installed."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'tasks.sqlite'}"
        return
    if postgres_bin() is None:
        pytest.skip("PostgreSQL binaries absent (apt-get install postgresql)")
    with postgres_cluster(free_port()) as url:
        yield url


async def test_a_running_task_ends_failed_with_a_reason_at_shutdown(tiny_gguf, tmp_path, database):
    flags = ("--skills", "technical_analysis", "--max-tokens", str(LONG), "--database-url", database)
    node = start_tiny_node(tiny_gguf, tmp_path, *flags)
    try:
        async with http_client() as http:
            client = await a2a_client(http, node.url)
            request = user_message("a long answer, please", max_tokens=LONG)
            request.configuration.CopyFrom(SendMessageConfiguration(return_immediately=True))
            task_id = [r async for r in client.send_message(request)][0].task.id  # noqa: RUF015 (an async generator)

            async def working():
                task = await client.get_task(GetTaskRequest(id=task_id))
                return task.status.state == TaskState.TASK_STATE_WORKING

            await poll_until(working, timeout_s=60)
        assert node.stop() == 0
        node.start()  # the same database: what did the shutdown leave?
        async with http_client() as http:
            task = await (await a2a_client(http, node.url)).get_task(GetTaskRequest(id=task_id))
    finally:
        node.stop()
    assert task.status.state == TaskState.TASK_STATE_FAILED
    assert SHUTDOWN_REASON in task.status.message.parts[0].text


@pytest.fixture(scope="module")
def node(tiny_gguf, tmp_path_factory):
    process = start_tiny_node(
        tiny_gguf, tmp_path_factory.mktemp("tiny-overflow"), "--skills", "technical_analysis"
    )
    yield process
    process.stop()


async def test_a_conversation_past_the_context_drops_its_oldest_turns(node):
    # The tiny model reads one token per byte; its context is 32768 tokens.
    turns = ["a" * 13000, "b" * 14000, "c" * 100]
    async with http_client() as http:
        client = await a2a_client(http, node.url)
        context_id, tasks = None, []
        for text in turns:
            responses = [r async for r in client.send_message(user_message(text, context_id, max_tokens=2))]
            task = responses[0].task
            context_id = task.context_id
            tasks.append(task)
    states = [TaskState.Name(t.status.state) for t in tasks]
    assert states == ["TASK_STATE_COMPLETED"] * 3, [t.status.message for t in tasks]
    assert "droppedTurns" not in metadata_of(tasks[0])
    assert metadata_of(tasks[1])["droppedTurns"] == 1  # the first turn made room for the second
    assert "droppedTurns" not in metadata_of(tasks[2])  # and stays dropped: later turns fit again

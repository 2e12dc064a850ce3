"""Delegation failure handling against scripted A2A peers (a2a-sdk servers on uvicorn, no model):
a slow peer times out and its task is cancelled, a FAILED one is skipped, the next one answers;
with no peer left the sub-task is reported missing."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import httpx
import uvicorn
from a2a.helpers import new_task
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import AgentCapabilities, AgentCard, AgentInterface, AgentSkill, Part, TaskState
from starlette.applications import Starlette

from node.config import NodeConfig
from node.network.peers import Delegator, PeerClient, PeerDirectory
from tests.conftest import free_port

SKILL = "technical_analysis"
PEER_TIMEOUT_S = 1.5
START_TIMEOUT_S = 30


class ScriptedPeer(AgentExecutor):
    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.cancelled = threading.Event()

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        await event_queue.enqueue_event(
            new_task(
                context.task_id, context.context_id, TaskState.TASK_STATE_SUBMITTED, history=[context.message]
            )
        )
        updater = TaskUpdater(event_queue, context.task_id, context.context_id)
        await updater.start_work()
        if self.behaviour == "slow":
            await asyncio.sleep(60)
        elif self.behaviour == "fail":
            await updater.failed(updater.new_agent_message([Part(text="out of memory")]))
        else:
            await updater.add_artifact([Part(text="use a cache")], name="answer", last_chunk=True)
            await updater.update_status(
                TaskState.TASK_STATE_COMPLETED, metadata={"usage": {"generatedTokens": 3}}
            )

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        self.cancelled.set()
        await TaskUpdater(event_queue, context.task_id, context.context_id).cancel()


def _app(url: str, executor: AgentExecutor) -> Starlette:
    card = AgentCard(
        name="scripted",
        description="scripted peer",
        version="1",
        supported_interfaces=[
            AgentInterface(url=url + "/", protocol_binding="JSONRPC", protocol_version="1.0")
        ],
        capabilities=AgentCapabilities(streaming=True),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[AgentSkill(id=SKILL, name=SKILL, description="scripted", tags=["test"])],
    )
    handler = DefaultRequestHandler(agent_executor=executor, task_store=InMemoryTaskStore(), agent_card=card)
    return Starlette(routes=[*create_agent_card_routes(card), *create_jsonrpc_routes(handler, rpc_url="/")])


@contextlib.asynccontextmanager
async def scripted_peers(*behaviours: str):
    """url -> executor for each behaviour, served by uvicorn in this event loop."""
    scripted, servers = {}, []
    for behaviour in behaviours:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        scripted[url] = ScriptedPeer(behaviour)
        config = uvicorn.Config(_app(url, scripted[url]), host="127.0.0.1", port=port, log_level="warning")
        servers.append(uvicorn.Server(config))
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
    try:
        while not all(server.started for server in servers):
            assert not any(task.done() for task in tasks), [t.exception() for t in tasks if t.done()]
            assert asyncio.get_running_loop().time() < deadline, "the scripted peers did not start"
            await asyncio.sleep(0.05)
        yield scripted
    finally:
        for server in servers:
            server.should_exit = True
            server.force_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_slow_and_failed_peers_are_skipped_for_the_next_one():
    async with scripted_peers("slow", "fail", "good") as peers, httpx.AsyncClient(timeout=30) as http:
        slow, failing, good = peers
        config = NodeConfig(port=free_port(), skills=("coordination",), peers=(slow, failing, good))
        delegator = Delegator(PeerDirectory(config, http), PeerClient(http, timeout_s=PEER_TIMEOUT_S))
        result = await delegator.run(SKILL, "Cache or not?", "ctx-1", {"max_tokens": 3})
    assert result.answer is not None and result.answer.text == "use a cache"
    assert result.answer.usage == {"generatedTokens": 3}
    assert result.peer == good
    outcomes = [(a.peer, a.outcome) for a in result.attempts]
    assert outcomes == [(slow, "timeout"), (failing, "failed"), (good, "completed")]
    assert "out of memory" in result.attempts[1].detail
    # The slow peer (it never answers) was given the whole timeout, then told to stop (CancelTask)
    # instead of generating on for nobody.
    assert result.attempts[0].elapsed_s >= PEER_TIMEOUT_S
    assert peers[slow].cancelled.is_set()


async def test_no_peer_left_means_missing_with_reasons():
    async with scripted_peers("fail") as peers, httpx.AsyncClient(timeout=30) as http:
        (failing,) = peers
        dead = f"http://127.0.0.1:{free_port()}"
        config = NodeConfig(port=free_port(), skills=("coordination",), peers=(failing, dead))
        delegator = Delegator(PeerDirectory(config, http), PeerClient(http, timeout_s=PEER_TIMEOUT_S))
        result = await delegator.run(SKILL, "Cache or not?", "ctx-2", {})
        nobody = await delegator.run("business_analysis", "Worth it?", "ctx-2", {})
    assert result.answer is None and [a.outcome for a in result.attempts] == ["failed"]
    assert nobody.answer is None and nobody.attempts == ()

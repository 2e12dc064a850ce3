"""The conformance agent: the scenarios of the A2A conformance kit on the node's own A2A stack.

The kit (github.com/a2aproject/a2a-tck) drives the agent under test in-band: the prefix of a
message's `messageId` names a scenario of its `scenarios/*.feature` (`tck-complete-task`: complete
the task with a message; `tck-input-required`: stop in INPUT_REQUIRED; `tck-artifact-file`: add a
file artifact, ...). No skill of the node plays them, since the skills answer with a model, so
`serve --conformance` adds this agent at `/conformance` with its own card. Everything but the
executor is what the skills use (`node.a2a.server`): `NodeRequestHandler`, the node's task store,
streaming, push configuration store and sender, the JSON-RPC and HTTP+JSON routes. The kit's
requirements thereby test the node's protocol code, not a sample server.

Deliberate differences from the kit's generated Python agent (`sut/a2a-python/sut_agent.py`):
the Task is enqueued before any status update (the SDK's contract), a chunked artifact keeps one
artifactId across its chunks, a direct Message reply names no task, and `tck-reject-task` ends in
the protocol's REJECTED state rather than raising an error.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

from a2a.helpers import new_task
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.tasks import TaskUpdater
from a2a.types import Message, Part, Role, TaskState
from google.protobuf import struct_pb2
from google.protobuf.json_format import ParseDict

from node.a2a.executor import task_context_id

Scenario = Callable[[TaskUpdater], Awaitable[None]]
# "wait for 2x streaming timeout": the kit's streaming timeout is 2 s.
RESUBSCRIBE_WAIT_S = 4.0
MESSAGE_RESPONSE = "tck-message-response"
DIRECT_REPLY = "Direct message response"
FILE_TEXT = b"tck"


def _file_part() -> Part:
    return Part(raw=FILE_TEXT, media_type="text/plain", filename="output.txt")


def _url_part() -> Part:
    return Part(url="https://example.com/output.txt", media_type="text/plain", filename="output.txt")


def _data_part() -> Part:
    return Part(data=ParseDict({"key": "value", "count": 42}, struct_pb2.Value()))


def artifact_task(part: Callable[[], Part], streamed: bool) -> Scenario:
    """One artifact, then COMPLETED (streamed scenarios report WORKING first)."""

    async def run(updater: TaskUpdater) -> None:
        if streamed:
            await updater.start_work()
        await updater.add_artifact([part()])
        await updater.complete()

    return run


def text_artifact_task(text: str, streamed: bool = True) -> Scenario:
    return artifact_task(lambda: Part(text=text), streamed)


async def complete_task(updater: TaskUpdater) -> None:
    await updater.complete(updater.new_agent_message([Part(text="Hello from TCK")]))


async def complete_only(updater: TaskUpdater) -> None:
    await updater.complete()


async def input_required(updater: TaskUpdater) -> None:
    await updater.requires_input()


async def reject(updater: TaskUpdater) -> None:
    await updater.reject(updater.new_agent_message([Part(text="rejected")]))


async def chunked_artifact(updater: TaskUpdater) -> None:
    await updater.start_work()
    artifact_id = f"chunked-{uuid.uuid4().hex[:12]}"
    await updater.add_artifact([Part(text="chunk-1 ")], artifact_id=artifact_id, append=False)
    await updater.add_artifact([Part(text="chunk-2")], artifact_id=artifact_id, append=True, last_chunk=True)
    await updater.complete()


async def long_running(updater: TaskUpdater) -> None:
    await updater.start_work()
    await asyncio.sleep(RESUBSCRIBE_WAIT_S)
    await updater.complete()


# The kit's scenarios by messageId prefix (scenarios/core_operations.feature, streaming.feature).
SCENARIOS: dict[str, Scenario] = {
    "tck-complete-task": complete_task,
    "tck-artifact-text": text_artifact_task("Generated text content", streamed=False),
    "tck-artifact-file": artifact_task(_file_part, streamed=False),
    "tck-artifact-file-url": artifact_task(_url_part, streamed=False),
    "tck-artifact-data": artifact_task(_data_part, streamed=False),
    "tck-input-required": input_required,
    "tck-reject-task": reject,
    "tck-stream-001": text_artifact_task("Stream hello from TCK"),
    "tck-stream-002": complete_only,
    "tck-stream-003": text_artifact_task("Stream task lifecycle"),
    "tck-stream-ordering-001": text_artifact_task("Ordered output"),
    "tck-stream-artifact-text": text_artifact_task("Streamed text content"),
    "tck-stream-artifact-file": artifact_task(_file_part, streamed=True),
    "tck-stream-artifact-chunked": chunked_artifact,
    "test-resubscribe-message-id": long_running,
}


def scenario_for(message_id: str) -> Scenario | None:
    """The scenario whose prefix `message_id` starts with, the longest one when several do
    (`tck-artifact-file-url` over `tck-artifact-file`)."""
    matches = [prefix for prefix in SCENARIOS if message_id.startswith(prefix)]
    return SCENARIOS[max(matches, key=len)] if matches else None


def unscripted(message_id: str) -> Scenario:
    """What a message without a scenario gets: its task completed with a short reply."""

    async def run(updater: TaskUpdater) -> None:
        reply = f"completed: no conformance scenario for messageId {message_id!r}"
        await updater.complete(updater.new_agent_message([Part(text=reply)]))

    return run


class ConformanceExecutor(AgentExecutor):
    """Plays the scenario a message's messageId names; a task is enqueued before its first update."""

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        message = context.message
        message_id = message.message_id if message is not None else ""
        context_id = task_context_id(context)
        if message_id.startswith(MESSAGE_RESPONSE) and context.current_task is None:
            await event_queue.enqueue_event(direct_reply(context_id))
            return
        if context.current_task is None:
            history = [message] if message is not None else []
            task = new_task(context.task_id, context_id, TaskState.TASK_STATE_SUBMITTED, history=history)
            await event_queue.enqueue_event(task)
        scenario = scenario_for(message_id) or unscripted(message_id)
        await scenario(TaskUpdater(event_queue, context.task_id, context_id))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        await TaskUpdater(event_queue, context.task_id, task_context_id(context)).cancel()


def direct_reply(context_id: str) -> Message:
    """The `tck-message-response` scenario: a Message instead of a task."""
    return Message(
        role=Role.ROLE_AGENT,
        message_id=str(uuid.uuid4()),
        context_id=context_id,
        parts=[Part(text=DIRECT_REPLY)],
    )

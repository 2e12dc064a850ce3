"""The A2A executor every skill shares: a task is one turn of a persistent conversation.

Contract (a2a-sdk): enqueue the Task, WORKING, the answer as chunks of one artifact (append), then
COMPLETED with `skill`, `finishReason` and `usage` (`a2a_usage`) in the task's metadata, or FAILED
with the reason. `cancel` sets the
task's stop event, which the agent manager checks before every token; the manager checkpoints the
agent either way, so its cache stays consistent with what it has seen.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from a2a.helpers import new_task
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.tasks import TaskUpdater
from a2a.types import Part, TaskState
from google.protobuf.json_format import MessageToDict

from node.a2a.conversation import Conversation, conversation_agent_id, system_prefix_tokens
from node.a2a.playbooks import playbook
from node.config import NodeConfig
from node.errors import NodeError
from node.server.guards import RequestGate

if TYPE_CHECKING:
    from node.mcp.tools import McpTools
    from node.memory.agents import AgentManager
    from node.model.engine import Engine
    from node.network.node_network import Network
    from node.runtime.events import Usage

logger = logging.getLogger(__name__)
ANSWER_ARTIFACT = "answer"
MAX_TOOL_ROUNDS = 4  # MCP tool calls per turn
DRAIN_S = 15.0
SHUTDOWN_REASON = "the node shut down before the task finished; send it again"


@dataclass
class SkillRuntime:
    """What executors share: settings, the agent manager (set at start-up), the node's network
    (the coordinator delegates through it), the admission gate every API shares and the running
    tasks' stop events."""

    config: NodeConfig
    manager: AgentManager | None = None
    network: Network | None = None
    running: dict[str, threading.Event] = field(default_factory=dict)
    base_contexts: dict[str, BaseContext] = field(default_factory=dict)
    gate: RequestGate = field(default_factory=lambda: RequestGate(16))
    shutting_down: bool = False
    tools: McpTools | None = None  # the --mcp-server tools, set at start-up

    def stop_all(self) -> None:
        """Stop every running generation (at shutdown: their agents are checkpointed as they stop,
        their tasks end FAILED with `SHUTDOWN_REASON`)."""
        self.shutting_down = True
        for stop in list(self.running.values()):
            stop.set()

    async def drain(self, timeout_s: float = DRAIN_S) -> None:
        """Wait (up to `timeout_s`) until every running task has written its terminal state."""
        deadline = time.monotonic() + timeout_s
        logger.info("shutdown: %d tasks running", len(self.running))
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.running:
            logger.warning("shutdown: %d tasks still running after %g s", len(self.running), timeout_s)

    def require_manager(self) -> AgentManager:
        if self.manager is None:
            raise NodeError("the node is still starting: no agent manager yet")
        return self.manager


@dataclass(frozen=True)
class BaseContext:
    """A skill's base agent at start-up: its tokens, how many came from the checkpoint, the time."""

    tokens: int
    restored_tokens: int
    seconds: float


@dataclass(frozen=True)
class TurnRequest:
    """One turn as the skill sees it, free of protocol types."""

    task_id: str
    context_id: str
    text: str
    metadata: dict


class SkillExecutor(AgentExecutor):
    """Answers with the skill's own persistent agent; subclasses set the id and system prompt.

    An instruction-tuned model reads the skill's `system_prompt`; a base model reads its playbook
    (`skills/playbooks/<skill_id>.txt`: worked examples it continues), which is prefilled once
    into the skill's base agent and restored from there for every conversation.
    """

    skill_id: ClassVar[str]
    system_prompt: ClassVar[str]

    def __init__(self, runtime: SkillRuntime) -> None:
        self.runtime = runtime
        # One turn at a time per conversation: its history is read, extended and saved as one step
        # (two turns sent at once would otherwise both extend the same old history).
        self._turn_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def _turn_lock(self, agent_id: str) -> asyncio.Lock:
        lock = self._turn_locks.get(agent_id)
        if lock is None:
            lock = self._turn_locks[agent_id] = asyncio.Lock()
        return lock

    def instructions(self, engine: Engine) -> str:
        text = self.system_prompt if engine.info.instruction_tuned else playbook(self.skill_id)
        tools = self.runtime.tools.instructions(engine) if self.runtime.tools is not None else ""
        return f"{text}\n\n{tools}" if tools else text

    # ---- start-up ------------------------------------------------------------------------
    async def warm_up(self) -> BaseContext:
        """Prefill the skill's base agent with its instructions once (kept on disk, restored after)."""
        manager = self.runtime.require_manager()
        prefix = system_prefix_tokens(manager.engine, self.instructions(manager.engine))
        started = time.perf_counter()
        restored = await manager.ensure_prefix(self.skill_id, prefix, pinned=True)
        return BaseContext(len(prefix), restored, round(time.perf_counter() - started, 3))

    # ---- AgentExecutor -------------------------------------------------------------------
    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        request = _turn_request(context)
        updater = TaskUpdater(event_queue, request.task_id, request.context_id)
        if context.current_task is None:
            task = new_task(
                request.task_id, request.context_id, TaskState.TASK_STATE_SUBMITTED, history=[context.message]
            )
            await event_queue.enqueue_event(task)
        await updater.start_work()
        stop = self.runtime.running.setdefault(request.task_id, threading.Event())
        try:
            if self.runtime.shutting_down:
                await updater.failed(updater.new_agent_message([Part(text=SHUTDOWN_REASON)]))
            else:
                await self._run_turn(request, updater, stop)
        except NodeError as e:
            logger.warning("task %s failed: %s", request.task_id, e)
            await updater.failed(updater.new_agent_message([Part(text=f"{type(e).__name__}: {e}")]))
        except Exception as e:
            logger.exception("task %s failed", request.task_id)
            await updater.failed(
                updater.new_agent_message([Part(text=f"internal error: {type(e).__name__}: {e}")])
            )
        finally:
            self.runtime.running.pop(request.task_id, None)
            self.runtime.gate.release(context.message.message_id if context.message else "")

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        stop = self.runtime.running.get(context.task_id)
        if stop is not None:
            stop.set()
        updater = TaskUpdater(event_queue, context.task_id, task_context_id(context))
        await updater.cancel()

    # ---- one turn ------------------------------------------------------------------------
    async def _run_turn(self, request: TurnRequest, updater: TaskUpdater, stop: threading.Event) -> None:
        out = TaskOutput(updater, self.runtime.config.stream_chunk_s)
        completion = await self.answer(request, out, stop)
        if completion.finish_reason == "cancelled" or stop.is_set():
            if self.runtime.shutting_down:  # stopped by the shutdown, not by cancel()
                logger.info("task %s: stopped by the shutdown", request.task_id)
                await updater.failed(updater.new_agent_message([Part(text=SHUTDOWN_REASON)]))
            return  # cancel() has written CANCELED
        usage = a2a_usage(completion.usage)
        metadata = {"skill": self.skill_id, "finishReason": completion.finish_reason, "usage": usage}
        if out.dropped_turns:  # the conversation outgrew the context: its oldest turns are gone
            metadata["droppedTurns"] = out.dropped_turns
        await updater.update_status(TaskState.TASK_STATE_COMPLETED, metadata=metadata)

    async def answer(self, request: TurnRequest, out: TaskOutput, stop: threading.Event):
        """Generate the reply to `request` with this skill's agent for its context -> Completion.

        Subclasses may add context to `request.text` first (the coordinator's delegation seam)."""
        manager = self.runtime.require_manager()
        agent_id = conversation_agent_id(self.skill_id, request.context_id)
        async with self._turn_lock(agent_id):
            return await self._answer_in_turn(manager, agent_id, request, out, stop)

    async def _answer_in_turn(self, manager, agent_id: str, request: TurnRequest, out: TaskOutput, stop):
        from node.runtime.events import Completion

        conversation = Conversation.from_metadata(await manager.metadata(agent_id))
        budget = self.sampling(request, manager.engine.prompt_format).max_tokens
        conversation, out.dropped_turns = await asyncio.to_thread(
            conversation.fitted, manager.engine, self.instructions(manager.engine), request.text, budget
        )
        messages = conversation.prompt(self.instructions(manager.engine), request.text)
        extra = {"skill": self.skill_id, "context_id": request.context_id}

        def record(completion: Completion) -> dict:
            # Evaluated by the manager before the checkpoint, so the reply is saved with the turn
            # (a cancelled turn keeps no reply: the next turn drops its question).
            reply = None if completion.finish_reason == "cancelled" else completion.text
            return conversation.metadata(request.text, reply, **extra)

        tools = self.runtime.tools
        for _ in range(1 + (MAX_TOOL_ROUNDS if tools is not None else 0)):
            completion = await self._round(manager, agent_id, messages, request, record, out, stop)
            call = tools.first_call(manager.engine, completion.text) if tools is not None else None
            if call is None or stop.is_set():
                break
            # The model's call and the tool's result become turns; the next round continues there.
            messages = [*messages, *await tools.exchange(manager.engine, call)]
        await out.close()
        return completion

    async def _round(self, manager, agent_id: str, messages, request: TurnRequest, record, out, stop):
        """One generation; with MCP tools, text that may open a call is held back and a complete
        call ends the round (the call itself is not part of the answer)."""
        from node.runtime.events import Completion, TextDelta

        tools, ended = self.runtime.tools, threading.Event()
        watcher = tools.watcher(manager.engine) if tools is not None else None
        completion = None
        stream = manager.stream(
            agent_id,
            manager.engine.encode_chat(messages),
            self.sampling(request, manager.engine.prompt_format),
            base_agent=self.skill_id,
            metadata=record,
            cancel=ended if watcher is not None else stop,
        )
        async for item in stream:
            match item:
                case TextDelta(text=text) if watcher is not None:
                    await out.write(watcher.feed(text))
                    if watcher.complete() or stop.is_set():
                        ended.set()
                case TextDelta(text=text):
                    await out.write(text)
                case Completion():
                    completion = item
        if watcher is not None and not watcher.complete():
            await out.write(watcher.text[watcher.sent :])  # a held-back tail that opened no call
        return completion

    def sampling(self, request: TurnRequest, prompt_format):
        """Greedy, within the node's cap, ending where the prompt format ends a reply."""
        from node.runtime.generation import SamplingParams

        cap = self.runtime.config.max_tokens
        asked = request.metadata.get("max_tokens")
        max_tokens = min(int(asked), cap) if isinstance(asked, (int, float)) and asked > 0 else cap
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0,
            turn_stop=prompt_format.stop,
            repetition_penalty=prompt_format.repetition_penalty,
        )


# A turn's usage in A2A metadata: camelCase keys like the rest of A2A's JSON (DM-SERIAL-001),
# seconds spelled out. The Anthropic and OpenAI APIs keep their own snake_case usage.
A2A_USAGE_KEYS = {
    "prompt_tokens": "promptTokens",
    "cached_tokens": "cachedTokens",
    "prefilled_tokens": "prefilledTokens",
    "generated_tokens": "generatedTokens",
    "prefill_s": "prefillSeconds",
    "generate_s": "generateSeconds",
    "restore_s": "restoreSeconds",
}


def a2a_usage(usage: Usage) -> dict:
    """`usage` as the task metadata carries it: {"promptTokens": ..., "prefillSeconds": ...}."""
    return {A2A_USAGE_KEYS[key]: value for key, value in usage.as_dict().items()}


def _turn_request(context: RequestContext) -> TurnRequest:
    metadata = {**context.metadata, **MessageToDict(context.message.metadata)}
    return TurnRequest(context.task_id, task_context_id(context), context.get_user_input(), metadata)


def task_context_id(context: RequestContext) -> str:
    """The contextId of the task the request is about.

    A follow-up that names its task but no context gets a fresh contextId from the SDK; the
    conversation (and the events, which the SDK checks against the stored task) is the task's."""
    task = context.current_task
    return task.context_id if task is not None and task.context_id else context.context_id


class TaskOutput:
    """What a turn publishes: its answer as chunks of one artifact, and any further artifacts (the
    coordinator's report).

    Text deltas are gathered for `chunk_s` seconds (the node's --stream-chunk) before they go out
    as one chunk: an SDK event per token costs the event loop enough that the model's thread,
    waiting for the GIL, decodes ~25% slower. The text gathered last is held back so that the last
    chunk is marked as such.
    """

    def __init__(self, updater: TaskUpdater, chunk_s: float, clock=time.monotonic) -> None:
        self._updater = updater
        self._chunk_s = chunk_s
        self._clock = clock
        self._artifact_id = f"{ANSWER_ARTIFACT}-{uuid.uuid4().hex[:12]}"
        self._pending: str | None = None
        self._pending_since = 0.0
        self._sent = 0
        self.dropped_turns = 0  # the oldest turns left out so that the prompt fits the context

    async def write(self, text: str) -> None:
        if not text:
            return
        now = self._clock()
        if self._pending is not None and now - self._pending_since >= self._chunk_s:
            await self._send(self._pending, last=False)
            self._pending = None
        if self._pending is None:
            self._pending, self._pending_since = text, now
        else:
            self._pending += text

    async def close(self) -> None:
        await self._send(self._pending or "", last=True)

    async def _send(self, text: str, last: bool) -> None:
        await self._updater.add_artifact(
            [Part(text=text)],
            artifact_id=self._artifact_id,
            name=ANSWER_ARTIFACT,
            append=self._sent > 0,
            last_chunk=last,
        )
        self._sent += 1

    async def add_artifact(self, parts: list[Part], name: str) -> None:
        await self._updater.add_artifact(parts, name=name, last_chunk=True)

"""Request handling on top of the SDK's `DefaultRequestHandler`.

`NodeRequestHandler` checks a message before any task exists for it, so bad input gets the
protocol's errors (JSON-RPC -32602/-32005, HTTP 400/415) instead of a failed task or a 500: a part
whose media type the agent's card does not list in `defaultInputModes` is the specification's
`ContentTypeNotSupportedError`.
Admission: with a `gate` (the node's, shared with the chat APIs), a message that would start
generating takes a slot first, released by the executor when its task ends; a full gate answers
`InternalError` with `data.reason = OVERLOADED` (JSON-RPC -32603; HTTP+JSON 429 with Retry-After,
`node.a2a.http_json`) before any task exists.
`SkillRouter` is the executor of the node's main endpoint: message metadata `skill` picks the
skill, the default skill takes the rest.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping, Sequence

from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.context import ServerCallContext
from a2a.server.events import Event, EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.types import AgentCard, Message, Part, SendMessageRequest, Task
from a2a.utils.errors import ContentTypeNotSupportedError, InternalError, InvalidParamsError
from google.protobuf.json_format import MessageToDict

from node.server.guards import Overloaded, RequestGate

SKILL_KEY = "skill"
OVERLOADED_REASON = "OVERLOADED"


def requested_skill(message: Message, request_metadata: Mapping | None = None) -> str | None:
    """The skill a message asks for: message metadata `skill`, else the request's metadata."""
    for metadata in (MessageToDict(message.metadata), dict(request_metadata or {})):
        value = metadata.get(SKILL_KEY)
        if value is not None:
            return value if isinstance(value, str) else repr(value)
    return None


# The media type of a part that does not name one, by the kind of its content.
IMPLIED_MEDIA_TYPES = {"text": "text/plain", "data": "application/json"}
UNNAMED_MEDIA_TYPE = "application/octet-stream"


def part_media_type(part: Part) -> str:
    declared = part.media_type.split(";", 1)[0].strip().lower()
    return declared or IMPLIED_MEDIA_TYPES.get(part.WhichOneof("content") or "", UNNAMED_MEDIA_TYPE)


def accepts(input_modes: Sequence[str], media_type: str) -> bool:
    """`media_type` is one of `input_modes` (which may hold `type/*` and `*/*`)."""
    kind = media_type.split("/", 1)[0]
    return any(mode in (media_type, f"{kind}/*", "*/*") for mode in input_modes)


def check_parts(message: Message, input_modes: Sequence[str], needs_text: bool = True) -> None:
    """Raise the protocol's error for a message the agent cannot take.

    `input_modes` are the media types the agent accepts (its card's `defaultInputModes`); with
    `needs_text` (the skills answer text) at least one part must be non-empty text."""
    if not message.parts:
        raise InvalidParamsError(message="message has no parts: send at least one text part")
    for index, part in enumerate(message.parts):
        media_type = part_media_type(part)
        if not accepts(input_modes, media_type):
            raise ContentTypeNotSupportedError(
                message=f"part {index} is {media_type}: this agent accepts {', '.join(input_modes)}"
            )
        if part.WhichOneof("content") == "text" and not part.text.strip():
            raise InvalidParamsError(message=f"part {index} has no text")
    if needs_text and not any(part.WhichOneof("content") == "text" for part in message.parts):
        raise ContentTypeNotSupportedError(message="no text part: this agent answers text parts only")


class NodeRequestHandler(DefaultRequestHandler):
    """`DefaultRequestHandler` that validates messages for one A2A agent of the node.

    `skills` are the skill ids a message may ask for at this endpoint (one for a skill's own
    endpoint, all hosted skills for the node's main endpoint, none for the conformance agent);
    the card's `defaultInputModes` are the media types its messages may carry."""

    def __init__(
        self,
        *,
        agent_card: AgentCard,
        skills: tuple[str, ...],
        needs_text: bool = True,
        gate: RequestGate | None = None,
        **kwargs,
    ) -> None:
        super().__init__(agent_card=agent_card, **kwargs)
        self.skills = skills
        self.needs_text = needs_text
        self.gate = gate
        self.input_modes = tuple(agent_card.default_input_modes)

    async def on_message_send(self, params: SendMessageRequest, context: ServerCallContext) -> Message | Task:
        self.check(params)
        self.admit(params)
        try:
            return await super().on_message_send(params, context)
        except BaseException:
            self.release(params)
            raise

    async def on_message_send_stream(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event, None]:
        self.check(params)
        self.admit(params)
        try:
            async for event in super().on_message_send_stream(params, context):
                yield event
        except Exception:
            self.release(params)
            raise

    def admit(self, params: SendMessageRequest) -> None:
        """Take a gate slot for the task this message starts (the executor releases it)."""
        if self.gate is None:
            return
        try:
            self.gate.reserve(params.message.message_id)
        except Overloaded as e:
            data = {"reason": OVERLOADED_REASON, "retryAfterSeconds": e.retry_after_s}
            raise InternalError(message=f"overloaded: {e.message}", data=data) from e

    def release(self, params: SendMessageRequest) -> None:
        if self.gate is not None:
            self.gate.release(params.message.message_id)

    async def settle(self, timeout_s: float) -> None:
        """Wait (up to `timeout_s`) until every task this handler runs has stored its last event.

        At shutdown the executors write a terminal state; the SDK's `aclose` force-closes active
        tasks, which would drop events still queued, so the app waits here first. (The SDK has no
        public way to ask; its registry's active tasks say `is_finished`.)"""
        registry = self._active_task_registry
        deadline = asyncio.get_running_loop().time() + timeout_s
        while any(not task.is_finished for task in list(registry._active_tasks.values())):
            if asyncio.get_running_loop().time() > deadline:
                return
            await asyncio.sleep(0.05)

    def check(self, params: SendMessageRequest) -> None:
        if not params.HasField("message"):
            raise InvalidParamsError(message="params.message is required")
        check_parts(params.message, self.input_modes, self.needs_text)
        skill = requested_skill(params.message, MessageToDict(params.metadata))
        if skill is not None and skill not in self.skills:
            raise InvalidParamsError(
                message=f"unknown skill {skill!r} at this endpoint; available: {', '.join(self.skills)}"
            )


class SkillRouter(AgentExecutor):
    """Hands each task of the main endpoint to the executor of the skill it asks for."""

    def __init__(self, executors: Mapping[str, AgentExecutor], default_skill: str) -> None:
        self.executors = dict(executors)
        self.default_skill = default_skill

    def pick(self, context: RequestContext) -> AgentExecutor:
        skill = requested_skill(context.message, context.metadata) if context.message else None
        return self.executors[skill or self.default_skill]

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        await self.pick(context).execute(context, event_queue)

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        # Running tasks are tracked in the runtime every skill executor shares: any of them can stop one.
        await self.executors[self.default_skill].cancel(context, event_queue)

"""Parse and validate an Anthropic Messages API request body into a `ChatRequest`.

`ChatRequest` is the node's own view of a chat turn, shared with the OpenAI API (`node.openai`):
the stable system text, the tool list, the conversation as turns of parts (text, tool calls,
tool results) and the sampling settings. How parts become prompt text is the model family's
business (`node.anthropic.tools`), decided when the prompt is rendered.

What a real client sends and where it goes (see RUNTIME_NOTES "What real Anthropic-API clients
send"): `role: "system"` messages between turns (the beta `mid-conversation-system-2026-04-07`) stay
in place, on the user side of the conversation; `thinking` blocks are dropped (clients resend their
own); images and documents are refused; the `x-anthropic-billing-header: cc_version=...` system block
that Claude Code changes on every run is dropped, so it neither names another agent nor cuts the
reused prefix; fields the node does not use (`thinking`, `context_management`, `output_config`,
`tool_choice`, `cache_control`, ...) are accepted and ignored. The session a request belongs to is
the `X-Claude-Code-Session-Id` header, else the `session_id` inside the JSON string
`metadata.user_id`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from node.anthropic.errors import invalid_request

ROLES = ("user", "assistant", "system")
VOLATILE_SYSTEM_PREFIXES = ("x-anthropic-billing-header:",)
SESSION_HEADER = "x-claude-code-session-id"
_SKIPPED_BLOCKS = ("thinking", "redacted_thinking")
_UNSUPPORTED_MEDIA = ("image", "document", "search_result", "container_upload")


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str = ""
    input_schema: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ToolCall:
    """A tool call the model made (or the client replays): its id, the tool and the arguments."""

    id: str
    name: str
    input: dict


@dataclass(frozen=True)
class ToolResult:
    tool_use_id: str
    text: str
    is_error: bool = False


Part = str | ToolCall | ToolResult


@dataclass(frozen=True)
class Turn:
    role: str  # "user" | "assistant"
    parts: tuple[Part, ...]

    @property
    def text(self) -> str:
        return join(*(p for p in self.parts if isinstance(p, str)))


@dataclass(frozen=True)
class ChatRequest:
    model: str
    system: str  # without volatile blocks
    tools: tuple[ToolSpec, ...]
    turns: tuple[Turn, ...]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop_sequences: tuple[str, ...] = ()
    stream: bool = False
    session_id: str | None = None


MessagesRequest = ChatRequest  # the name this module's callers know


def parse_messages_request(
    body: object, headers: Mapping[str, str] | None = None, *, require_max_tokens: bool = True
) -> ChatRequest:
    if not isinstance(body, dict):
        raise invalid_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid_request("model: a non-empty string is required")
    return ChatRequest(
        model=model,
        system=parse_system(body.get("system")),
        tools=parse_tools(body.get("tools")),
        turns=parse_turns(body.get("messages")),
        max_tokens=_max_tokens(body.get("max_tokens"), require_max_tokens),
        temperature=_unit_float(body, "temperature", 1.0),
        top_p=_unit_float(body, "top_p", 1.0),
        stop_sequences=_stop_sequences(body.get("stop_sequences")),
        stream=_flag(body, "stream"),
        session_id=session_id(body, headers or {}),
    )


def parse_system(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return "" if is_volatile(value) else value
    if not isinstance(value, list):
        raise invalid_request("system: expected a string or a list of text blocks")
    texts = []
    for i, block in enumerate(value):
        if (
            not isinstance(block, dict)
            or block.get("type") != "text"
            or not isinstance(block.get("text"), str)
        ):
            raise invalid_request(f"system.{i}: expected a text block {{'type': 'text', 'text': ...}}")
        if not is_volatile(block["text"]):
            texts.append(block["text"])
    return join(*texts)


def is_volatile(text: str) -> bool:
    """A system block whose value changes between runs of one client and carries no instruction."""
    return text.lstrip().startswith(VOLATILE_SYSTEM_PREFIXES)


def parse_tools(value: object) -> tuple[ToolSpec, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise invalid_request("tools: expected a list of tool objects")
    tools = []
    for i, tool in enumerate(value):
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise invalid_request(f"tools.{i}.name: a non-empty string is required")
        schema = tool.get("input_schema")
        description = tool.get("description")
        tools.append(
            ToolSpec(
                name,
                description if isinstance(description, str) else "",
                schema if isinstance(schema, dict) else {},
            )
        )
    return tuple(tools)


def parse_turns(value: object) -> tuple[Turn, ...]:
    """Messages as turns; consecutive messages of one side are merged, as the API does. A
    mid-conversation `system` message joins the user side in place, marked as the system's."""
    if not isinstance(value, list) or not value:
        raise invalid_request("messages: a non-empty list is required")
    turns: list[Turn] = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise invalid_request(f"messages.{i}.role: expected 'user', 'assistant' or 'system'")
        parts = content_parts(message.get("content"), f"messages.{i}.content")
        role = message["role"]
        if role == "system":
            role, parts = "user", tuple(system_note(p) for p in parts if isinstance(p, str))
        turns = merge_turn(turns, Turn(role, parts))
    if turns[0].role != "user":
        raise invalid_request("messages.0.role: the first message must use the 'user' role")
    return tuple(turns)


def system_note(text: str) -> str:
    return f"<system>\n{text}\n</system>"


def merge_turn(turns: list[Turn], turn: Turn) -> list[Turn]:
    if turns and turns[-1].role == turn.role:
        return [*turns[:-1], Turn(turn.role, turns[-1].parts + turn.parts)]
    return [*turns, turn]


def content_parts(content: object, where: str) -> tuple[Part, ...]:
    if isinstance(content, str):
        return (content,) if content else ()
    if not isinstance(content, list):
        raise invalid_request(f"{where}: expected a string or a list of content blocks")
    parts = (block_part(block, f"{where}.{i}") for i, block in enumerate(content))
    return tuple(p for p in parts if p)


def block_part(block: object, where: str) -> Part | None:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text" and isinstance(block.get("text"), str):
        return block["text"]
    if kind in _SKIPPED_BLOCKS:
        return None
    if kind in ("tool_use", "server_tool_use"):
        arguments = block.get("input")
        return ToolCall(str(block.get("id", "")), str(block.get("name", "")), arguments or {})
    if kind == "tool_result":
        return ToolResult(
            str(block.get("tool_use_id", "")),
            result_text(block.get("content", ""), f"{where}.content"),
            bool(block.get("is_error")),
        )
    if kind in _UNSUPPORTED_MEDIA:
        raise invalid_request(f"{where}: {kind} blocks are not supported: this node serves a text-only model")
    if isinstance(kind, str) and kind.endswith("_tool_result"):  # server tools' results (web search, ...)
        return json.dumps(block.get("content"), sort_keys=True)
    raise invalid_request(f"{where}: unsupported content block type {kind!r}")


def result_text(content: object, where: str) -> str:
    """A tool result's content as text; images in it (a screenshot tool) are named, not sent."""
    if isinstance(content, list):
        texts = [
            "[image omitted: text-only model]" if isinstance(b, dict) and b.get("type") == "image" else b
            for b in content
        ]
        return join(*(p for p in content_parts(texts, where) if isinstance(p, str)))
    return join(*(p for p in content_parts(content, where) if isinstance(p, str)))


def session_id(body: dict, headers: Mapping[str, str]) -> str | None:
    """Claude Code's session: its header, else `session_id` in the JSON string `metadata.user_id`."""
    if headers.get(SESSION_HEADER):
        return headers[SESSION_HEADER]
    metadata = body.get("metadata")
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    if not isinstance(user_id, str) or not user_id.startswith("{"):
        return None
    try:
        value = json.loads(user_id).get("session_id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def join(*parts: str) -> str:
    return "\n\n".join(p for p in parts if p)


def _max_tokens(value: object, required: bool) -> int:
    if value is None and not required:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid_request("max_tokens: a positive integer is required")
    return value


def _unit_float(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise invalid_request(f"{name}: expected a number between 0 and 1")
    return float(value)


MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256


def checked_stops(values: tuple[str, ...], name: str) -> tuple[str, ...]:
    """At most MAX_STOP_SEQUENCES of at most MAX_STOP_CHARS each: every stop costs a search per
    generated token."""
    if len(values) > MAX_STOP_SEQUENCES or any(len(s) > MAX_STOP_CHARS for s in values):
        raise invalid_request(
            f"{name}: at most {MAX_STOP_SEQUENCES} sequences of at most {MAX_STOP_CHARS} characters"
        )
    return values


def _stop_sequences(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise invalid_request("stop_sequences: expected a list of non-empty strings")
    return checked_stops(tuple(value), "stop_sequences")


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool) and value is not None:
        raise invalid_request(f"{name}: expected a boolean")
    return bool(value)

"""Parse and validate an Anthropic Messages API request body into a `MessagesRequest`.

Content blocks become plain text here, because the node serves text-only models: `text` as is,
`tool_use` and `tool_result` as tagged text, `thinking` dropped (clients resend their own), images
and documents refused. Fields the node does not use (`metadata`, `tool_choice`, `thinking`,
`context_management`, ...) are accepted and ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from node.anthropic.errors import invalid_request

ROLES = ("user", "assistant")
_SKIPPED_BLOCKS = ("thinking", "redacted_thinking")
_UNSUPPORTED_MEDIA = ("image", "document", "search_result", "container_upload")


@dataclass(frozen=True)
class Turn:
    role: str  # "user" | "assistant"
    text: str


@dataclass(frozen=True)
class MessagesRequest:
    model: str
    system: str  # system prompt plus the rendered tool list
    turns: tuple[Turn, ...]
    max_tokens: int
    temperature: float
    top_p: float
    stop_sequences: tuple[str, ...]
    stream: bool


def parse_messages_request(body: object, *, require_max_tokens: bool = True) -> MessagesRequest:
    if not isinstance(body, dict):
        raise invalid_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid_request("model: a non-empty string is required")
    system = _join(parse_system(body.get("system")), render_tools(body.get("tools")))
    return MessagesRequest(
        model=model,
        system=system,
        turns=parse_turns(body.get("messages")),
        max_tokens=_max_tokens(body.get("max_tokens"), require_max_tokens),
        temperature=_unit_float(body, "temperature", 1.0),
        top_p=_unit_float(body, "top_p", 1.0),
        stop_sequences=_stop_sequences(body.get("stop_sequences")),
        stream=_flag(body, "stream"),
    )


def parse_system(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
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
        texts.append(block["text"])
    return "\n\n".join(texts)


def render_tools(value: object) -> str:
    """The tool list as text, deterministic so that the prompt prefix stays the same across calls."""
    if value is None or value == []:
        return ""
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise invalid_request("tools: expected a list of tool objects")
    sections = ["# Tools"]
    for i, tool in enumerate(value):
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise invalid_request(f"tools.{i}.name: a non-empty string is required")
        lines = [f"## {name}"]
        if isinstance(tool.get("description"), str):
            lines.append(tool["description"])
        if "input_schema" in tool:
            lines.append("Input schema: " + json.dumps(tool["input_schema"], sort_keys=True))
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def parse_turns(value: object) -> tuple[Turn, ...]:
    """Messages as turns; consecutive messages of one role are merged, as the API does."""
    if not isinstance(value, list) or not value:
        raise invalid_request("messages: a non-empty list is required")
    turns: list[Turn] = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise invalid_request(f"messages.{i}.role: expected 'user' or 'assistant'")
        text = content_text(message.get("content"), f"messages.{i}.content")
        if turns and turns[-1].role == message["role"]:
            turns[-1] = Turn(message["role"], _join(turns[-1].text, text))
        else:
            turns.append(Turn(message["role"], text))
    if turns[0].role != "user":
        raise invalid_request("messages.0.role: the first message must use the 'user' role")
    return tuple(turns)


def content_text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid_request(f"{where}: expected a string or a list of content blocks")
    return _join(*(block_text(block, f"{where}.{i}") for i, block in enumerate(content)))


def block_text(block: object, where: str) -> str:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text" and isinstance(block.get("text"), str):
        return block["text"]
    if kind in _SKIPPED_BLOCKS:
        return ""
    if kind == "tool_use":
        arguments = json.dumps(block.get("input", {}), sort_keys=True)
        return f"[tool_use {block.get('name', '')} id={block.get('id', '')}] {arguments}"
    if kind == "tool_result":
        status = " error" if block.get("is_error") else ""
        body = content_text(block.get("content", ""), f"{where}.content")
        return f"[tool_result id={block.get('tool_use_id', '')}{status}]\n{body}"
    if kind in _UNSUPPORTED_MEDIA:
        raise invalid_request(f"{where}: {kind} blocks are not supported: this node serves a text-only model")
    raise invalid_request(f"{where}: unsupported content block type {kind!r}")


def _join(*parts: str) -> str:
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


def _stop_sequences(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise invalid_request("stop_sequences: expected a list of non-empty strings")
    return tuple(value)


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool) and value is not None:
        raise invalid_request(f"{name}: expected a boolean")
    return bool(value)

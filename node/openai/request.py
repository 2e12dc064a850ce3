"""Parse an OpenAI chat completions body into the node's `ChatRequest` (`node.anthropic.request`).

Leading `system`/`developer` messages are the system prompt; later ones join the user side in
place, as mid-conversation system messages do in the Messages API. `tool_calls` of assistant
messages and `tool` messages become the same tool calls and results, and `tools` the same tool list,
so an OpenAI client and an Anthropic client with the same conversation render the same prompt and
are served from the same cached agents. Unknown fields are ignored; `n` above 1, images and audio
are refused. Without `max_completion_tokens`/`max_tokens` the node's own cap applies.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from node.anthropic.errors import invalid_request
from node.anthropic.request import (
    ChatRequest,
    Part,
    ToolCall,
    ToolResult,
    ToolSpec,
    Turn,
    checked_stops,
    content_parts,
    join,
    merge_turn,
    session_id,
    system_note,
)

UNLIMITED = 1 << 30
_SYSTEM_ROLES = ("system", "developer")
_UNSUPPORTED_PARTS = ("image_url", "input_audio", "file")


@dataclass(frozen=True)
class CompletionsRequest:
    chat: ChatRequest
    include_usage: bool


def parse_completions_request(body: object, headers: Mapping[str, str] | None = None) -> CompletionsRequest:
    if not isinstance(body, dict):
        raise invalid_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid_request("model: a non-empty string is required")
    if body.get("n") not in (None, 1):
        raise invalid_request("n: this node returns one choice")
    system, turns = parse_messages(body.get("messages"))
    stream = body.get("stream") is True
    options = body.get("stream_options")
    chat = ChatRequest(
        model=model,
        system=system,
        tools=parse_tools(body.get("tools")),
        turns=turns,
        max_tokens=_max_tokens(body),
        temperature=_number(body, "temperature", 1.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1.0),
        stop_sequences=_stop(body.get("stop")),
        stream=stream,
        session_id=session_id(body, headers or {}),
    )
    return CompletionsRequest(
        chat, stream and isinstance(options, dict) and options.get("include_usage") is True
    )


def parse_messages(value: object) -> tuple[str, tuple[Turn, ...]]:
    if not isinstance(value, list) or not value:
        raise invalid_request("messages: a non-empty list is required")
    system: list[str] = []
    turns: list[Turn] = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise invalid_request(f"messages[{i}]: expected an object")
        role, where = message.get("role"), f"messages[{i}]"
        if role in _SYSTEM_ROLES and not turns:
            system.append(_text(message.get("content"), where))
        elif role in _SYSTEM_ROLES:
            turns = merge_turn(turns, Turn("user", (system_note(_text(message.get("content"), where)),)))
        elif role == "user":
            turns = merge_turn(turns, Turn("user", _parts(message.get("content"), where)))
        elif role == "assistant":
            turns = merge_turn(turns, Turn("assistant", _assistant_parts(message, where)))
        elif role == "tool":
            result = ToolResult(str(message.get("tool_call_id", "")), _text(message.get("content"), where))
            turns = merge_turn(turns, Turn("user", (result,)))
        else:
            raise invalid_request(f"{where}.role: expected system, developer, user, assistant or tool")
    if not turns or turns[0].role != "user":
        raise invalid_request("messages: the conversation must start with a user message")
    return join(*system), tuple(turns)


def _parts(content: object, where: str) -> tuple[Part, ...]:
    if isinstance(content, list):
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") in _UNSUPPORTED_PARTS:
                raise invalid_request(f"{where}.content[{j}]: {part['type']} parts are not supported")
    return content_parts("" if content is None else content, f"{where}.content")


def _text(content: object, where: str) -> str:
    return join(*(p for p in _parts(content, where) if isinstance(p, str)))


def _assistant_parts(message: dict, where: str) -> tuple[Part, ...]:
    calls = []
    for j, call in enumerate(message.get("tool_calls") or []):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid_request(f"{where}.tool_calls[{j}]: expected a function call")
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except ValueError as e:
            raise invalid_request(f"{where}.tool_calls[{j}].function.arguments: not JSON") from e
        calls.append(ToolCall(str(call.get("id", "")), function["name"], arguments))
    return _parts(message.get("content"), where) + tuple(calls)


def parse_tools(value: object) -> tuple[ToolSpec, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise invalid_request("tools: expected a list")
    tools = []
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid_request(f"tools[{i}]: expected {{'type': 'function', 'function': {{'name': ...}}}}")
        description, schema = function.get("description"), function.get("parameters")
        tools.append(
            ToolSpec(
                function["name"],
                description if isinstance(description, str) else "",
                schema if isinstance(schema, dict) else {},
            )
        )
    return tuple(tools)


def _max_tokens(body: dict) -> int:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return UNLIMITED
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid_request("max_completion_tokens: a positive integer is required")
    return value


def _number(body: dict, name: str, default: float, most: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= most:
        raise invalid_request(f"{name}: expected a number between 0 and {most:g}")
    return float(value)


def _stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(s, str) and s for s in values):
        raise invalid_request("stop: expected a string or a list of strings")
    return checked_stops(tuple(values), "stop")

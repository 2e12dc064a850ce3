"""Render a `ChatRequest` into prompt tokens with the model's chat template, and name its family.

The stable system text and the tool list name a family of agents (`family_id`): the conversations
under one system prompt. Which agent of the family serves a request is `node.memory.sessions`'s
choice; each keeps its own KV cache, and because each request carries the whole conversation, the
manager's longest-common-prefix reuse means a client that resends a growing conversation pays
prefill only for the new turn. Tool calls and results are written in the model family's own
convention (`node.anthropic.tools`). A final assistant message is a prefill: the model continues it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from node.anthropic.request import ChatRequest, Part, ToolCall, ToolResult, join
from node.anthropic.tools import ToolFormat, tool_format
from node.memory.agent_ids import derived_agent_id

AGENT_NAMESPACE = "anthropic"


@dataclass(frozen=True)
class Prompt:
    family_id: str
    tokens: list[int]
    tools: ToolFormat
    private: bool = False  # the family is the caller's own: usage counts only its own cache


def agent_id_for(system: str) -> str:
    return derived_agent_id(AGENT_NAMESPACE, system)


def family_key(request: ChatRequest) -> str:
    """What names the family: the system text, then the tools (none: the system text alone)."""
    if not request.tools:
        return request.system
    tools = [[t.name, t.description, t.input_schema] for t in request.tools]
    return request.system + "\n\n" + json.dumps(tools, sort_keys=True)


def part_text(part: Part, tools: ToolFormat) -> str:
    if isinstance(part, ToolCall):
        return tools.call_text(part)
    if isinstance(part, ToolResult):
        return tools.result_text(part)
    return part


def chat_messages(request: ChatRequest, tools: ToolFormat) -> tuple[list[dict], str]:
    """Template messages (template roles, system first) and the assistant prefill text, if any."""
    turns = list(request.turns)
    last = turns.pop() if turns[-1].role == "assistant" else None
    prefill = join(*(part_text(p, tools) for p in last.parts)).rstrip() if last else ""
    system = join(request.system, tools.instructions(request.tools) if request.tools else "")
    messages = [{"role": "system", "content": system}] if system else []
    messages.extend(
        {"role": turn.role, "content": join(*(part_text(p, tools) for p in turn.parts))} for turn in turns
    )
    return messages, prefill


def render_prompt(engine, request: ChatRequest) -> Prompt:
    tools = tool_format(engine)
    messages, prefill = chat_messages(request, tools)
    tokens = engine.encode_chat(messages, add_generation_prompt=True)
    if prefill:
        tokens = tokens + engine.encode(prefill, add_bos=False)
    return Prompt(agent_id_for(family_key(request)), tokens, tools)

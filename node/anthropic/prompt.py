"""Render a `MessagesRequest` into prompt tokens with the model's chat template, and name its agent.

The system prompt (with the tool list) identifies the persistent agent: every conversation under
one system prompt shares one KV cache, and because each request carries the whole conversation,
the manager's longest-common-prefix reuse means a client that resends a growing conversation pays
prefill only for the new turn. A final assistant message is a prefill: the model continues it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from node.anthropic.request import MessagesRequest

AGENT_PREFIX = "anthropic-"


@dataclass(frozen=True)
class Prompt:
    agent_id: str
    tokens: list[int]


def agent_id_for(system: str) -> str:
    return AGENT_PREFIX + hashlib.sha256(system.encode("utf-8")).hexdigest()[:24]


def chat_messages(request: MessagesRequest) -> tuple[list[dict], str]:
    """Template messages (template roles, system first) and the assistant prefill text, if any."""
    turns = list(request.turns)
    prefill = turns.pop().text.rstrip() if turns[-1].role == "assistant" else ""
    messages = [{"role": "system", "content": request.system}] if request.system else []
    messages.extend({"role": turn.role, "content": turn.text} for turn in turns)
    return messages, prefill


def render_prompt(engine, request: MessagesRequest) -> Prompt:
    messages, prefill = chat_messages(request)
    tokens = engine.encode_chat(messages, add_generation_prompt=True)
    if prefill:
        tokens = tokens + engine.encode(prefill, add_bos=False)
    return Prompt(agent_id_for(request.system), tokens)

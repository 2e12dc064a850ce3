"""A request of Claude Code's shape (RUNTIME_NOTES "What real Anthropic-API clients send"), built
here with our own text: the billing-header system block that changes on every run, 3 system blocks
with `cache_control`, tools, a `<system-reminder>` opening the first user message, a mid-conversation
`system` message, `thinking`, `context_management`, `output_config`, `metadata.user_id` as a JSON
string, and Claude Code's headers."""

from __future__ import annotations

import json
import uuid

TOOLS = [
    {
        "name": name,
        "description": f"{name} tool. " + "Use it carefully and report what it returns. " * 6,
        "input_schema": {
            "type": "object",
            "properties": {"path": {"type": "string", "description": "the file"}},
            "required": ["path"],
        },
    }
    for name in ("Read", "Write", "Edit", "Bash", "Grep", "Glob")
]
SYSTEM_TEXT = "You are a coding agent. Answer briefly. " * 12
BETAS = "claude-code-20250219,interleaved-thinking-2025-05-14,mid-conversation-system-2026-04-07"


def system_blocks(run: str) -> list[dict]:
    return [
        {
            "type": "text",
            "text": f"x-anthropic-billing-header: cc_version=2.1.197.{run}; cc_entrypoint=sdk-cli;",
        },
        {
            "type": "text",
            "text": "You are Claude Code, a CLI for coding.",
            "cache_control": {"type": "ephemeral"},
        },
        {"type": "text", "text": SYSTEM_TEXT, "cache_control": {"type": "ephemeral"}},
    ]


def first_messages(prompt: str, date: str = "2026-12-02") -> list[dict]:
    reminder = f"<system-reminder>\nToday's date is {date}.\n</system-reminder>"
    return [
        {"role": "user", "content": [{"type": "text", "text": reminder}, {"type": "text", "text": prompt}]},
        {"role": "system", "content": "Agent types available: general-purpose, explore, plan. " * 8},
    ]


def body(run: str, session_id: str, messages: list[dict], max_tokens: int = 32000) -> dict:
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": max_tokens,
        "stream": True,
        "system": system_blocks(run),
        "tools": TOOLS,
        "messages": messages,
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "medium"},
        "metadata": {"user_id": json.dumps({"device_id": uuid.uuid4().hex, "session_id": session_id})},
        "temperature": 0.0,
    }


def headers(session_id: str, api_key: str = "k") -> dict:
    return {
        "x-api-key": api_key,
        "anthropic-version": "2023-06-01",
        "anthropic-beta": BETAS,
        "X-Claude-Code-Session-Id": session_id,
        "x-app": "cli",
        "user-agent": "claude-cli/2.1.197 (external, sdk-cli)",
    }


def events(sse_text: str) -> list[tuple[str, dict]]:
    """(event, data) pairs of an SSE response body."""
    pairs = []
    for chunk in sse_text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.splitlines() if ": " in line)
        if "event" in lines:
            pairs.append((lines["event"], json.loads(lines["data"])))
    return pairs


def final_usage(pairs: list[tuple[str, dict]]) -> dict:
    return next(data["usage"] for event, data in pairs if event == "message_delta")


def reply_text(pairs: list[tuple[str, dict]]) -> str:
    return "".join(data["delta"].get("text", "") for event, data in pairs if event == "content_block_delta")

"""OpenAI chat completion objects and the `chat.completion.chunk` SSE stream.

A stream sends the role first, then content deltas, then each tool call as one delta (name and the
whole `arguments` JSON), a chunk with `finish_reason`, with `stream_options.include_usage` a last
chunk with empty `choices` and the usage, and `data: [DONE]`. While the model prefills or is silent
the stream sends SSE comments (`: ping`). A failure after the stream has started is sent as a
`data: {"error": ...}` chunk.

Usage: `prompt_tokens` is the prompt length, `prompt_tokens_details.cached_tokens` the part served
from the agent's persistent cache (the same count the Anthropic API reports as
`cache_read_input_tokens`). When the node's own output cap ended the turn, the finish reason is
`stop` and usage carries `server_output_cap` (see `node.anthropic.chat`).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator

from node.anthropic.chat import Reply
from node.anthropic.responses import PING_INTERVAL_S, ReplyStream
from node.openai.errors import openai_error

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
}
_PING = b": ping\n\n"


def completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def usage(reply: Reply) -> dict:
    counts = {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.output_tokens,
        "total_tokens": reply.prompt_tokens + reply.output_tokens,
        "prompt_tokens_details": {"cached_tokens": reply.cached_tokens},
    }
    return counts if reply.output_cap is None else {**counts, "server_output_cap": reply.output_cap}


def tool_calls(reply: Reply) -> list[dict]:
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.input)}}
        for c in reply.calls
    ]


def completion_body(cid: str, model: str, reply: Reply) -> dict:
    # No text is null beside tool calls (OpenAI's shape), else a string, empty when the model
    # stopped at once: clients read `content` as text.
    message: dict = {"role": "assistant", "content": None if reply.calls and not reply.text else reply.text}
    if reply.calls:
        message["tool_calls"] = tool_calls(reply)
    choice = {
        "index": 0,
        "message": message,
        "finish_reason": FINISH_REASONS[reply.stop_reason],
        "logprobs": None,
    }
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(reply),
    }


class ChunkWriter:
    def __init__(self, cid: str, model: str) -> None:
        self.base = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }

    def chunk(self, delta: dict | None, finish_reason: str | None = None, **extra) -> bytes:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
        return b"data: " + json.dumps({**self.base, "choices": choices, **extra}).encode() + b"\n\n"


async def completion_chunks(
    items: AsyncIterator, cid: str, model: str, include_usage: bool, ping_interval_s: float = PING_INTERVAL_S
) -> AsyncIterator[bytes]:
    writer, stream = ChunkWriter(cid, model), ReplyStream(items, ping_interval_s)
    yield writer.chunk({"role": "assistant", "content": ""})
    try:
        async for text in stream:
            yield _PING if text is None else writer.chunk({"content": text})
        reply = stream.finished()
    except Exception as e:  # noqa: BLE001 - headers are sent: report it in the stream
        yield b"data: " + json.dumps(openai_error(e)[1]).encode() + b"\n\n"
        return
    if stream.held_back:
        yield writer.chunk({"content": stream.held_back})
    for index, call in enumerate(tool_calls(reply)):
        yield writer.chunk({"tool_calls": [{"index": index, **call}]})
    yield writer.chunk({}, FINISH_REASONS[reply.stop_reason])
    if include_usage:
        yield writer.chunk(None, usage=usage(reply))
    yield b"data: [DONE]\n\n"

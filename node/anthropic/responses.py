"""Anthropic Messages responses: the message object, its usage, and the SSE event stream.

Streams follow the API's exact event order: message_start, content_block_start, ping,
content_block_delta*, content_block_stop, then one start/delta/stop group per tool call
(`input_json_delta`), message_delta (stop reason, cumulative usage), message_stop. Pings also go out
while the model prefills a long prompt (the manager reports `PrefillProgress`) and whenever nothing
else was sent for `ping_interval_s`, so clients and proxies with idle timeouts keep the connection.
A failure after the stream has started is sent as `event: error`.

Usage: `input_tokens` counts the prompt tokens that were prefilled for this request,
`cache_read_input_tokens` those served from the agent's persistent cache; their sum is the prompt
length. The node writes every prefilled token to its cache, but reports
`cache_creation_input_tokens` as 0 so that the three input counts never add up to more than the prompt.
When the node's own output cap (`--max-tokens`) ended the turn, usage also carries
`server_output_cap` (see `node.anthropic.chat`).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator

from node.anthropic.chat import Reply
from node.anthropic.errors import api_error_from
from node.runtime.events import TextDelta

PING_INTERVAL_S = 5.0
_PING = b'event: ping\ndata: {"type": "ping"}\n\n'
_TIMER = object()
_END = object()


def message_id() -> str:
    return "msg_" + secrets.token_hex(12)


def usage(reply: Reply) -> dict:
    counts = {
        "input_tokens": reply.prompt_tokens - reply.cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": reply.cached_tokens,
        "output_tokens": reply.output_tokens,
    }
    return counts if reply.output_cap is None else {**counts, "server_output_cap": reply.output_cap}


def message_shell(msg_id: str, model: str, input_tokens: int) -> dict:
    """The message as `message_start` announces it (before the cache lookup, all input counts)."""
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 0,
        },
    }


def tool_use_block(call) -> dict:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}


def message_body(msg_id: str, model: str, reply: Reply) -> dict:
    content = [{"type": "text", "text": reply.text}] if reply.text else []
    content += [tool_use_block(call) for call in reply.calls]
    return {
        **message_shell(msg_id, model, 0),
        "content": content,
        "stop_reason": reply.stop_reason,
        "stop_sequence": reply.stop_sequence,
        "usage": usage(reply),
    }


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def message_events(
    items: AsyncIterator, shell: dict, ping_interval_s: float = PING_INTERVAL_S
) -> AsyncIterator[bytes]:
    """SSE bytes for one streamed message, from the chat turn's text deltas, progress and Reply."""
    yield sse("message_start", {"type": "message_start", "message": shell})
    yield sse(
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    )
    yield _PING
    stream = ReplyStream(items, ping_interval_s)
    try:
        async for text in stream:
            yield _PING if text is None else sse("content_block_delta", _text_delta(text))
        reply = stream.finished()
    except Exception as e:  # noqa: BLE001 - headers are sent: report it in the stream
        yield sse("error", api_error_from(e).body())
        return
    if stream.held_back:  # text held back while it might have opened a tool call
        yield sse("content_block_delta", _text_delta(stream.held_back))
    yield sse("content_block_stop", {"type": "content_block_stop", "index": 0})
    for index, call in enumerate(reply.calls, start=1):
        for event, data in tool_use_events(index, call):
            yield sse(event, data)
    yield sse("message_delta", _message_delta(reply))
    yield sse("message_stop", {"type": "message_stop"})


def tool_use_events(index: int, call) -> list[tuple[str, dict]]:
    start = {**tool_use_block(call), "input": {}}
    delta = {"type": "input_json_delta", "partial_json": json.dumps(call.input)}
    return [
        ("content_block_start", {"type": "content_block_start", "index": index, "content_block": start}),
        ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}),
        ("content_block_stop", {"type": "content_block_stop", "index": index}),
    ]


def _text_delta(text: str) -> dict:
    return {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}


def _message_delta(reply: Reply) -> dict:
    delta = {"stop_reason": reply.stop_reason, "stop_sequence": reply.stop_sequence}
    return {"type": "message_delta", "delta": delta, "usage": usage(reply)}


class ReplyStream:
    """A chat turn's events as text to send, or None where a keep-alive is due (prefill progress,
    or `interval_s` of silence); then `finished()` is the `Reply` and `held_back` the text the
    stream did not send (held while it might have opened a tool call)."""

    def __init__(self, items: AsyncIterator, interval_s: float) -> None:
        self._items, self._interval_s = items, interval_s
        self._reply: Reply | None = None
        self._sent = 0

    async def __aiter__(self) -> AsyncIterator[str | None]:
        async for item in with_timer(self._items, self._interval_s):
            match item:
                case TextDelta(text=text):
                    self._sent += len(text)
                    yield text
                case Reply():
                    self._reply = item
                case _:  # PrefillProgress or the idle timer
                    yield None

    def finished(self) -> Reply:
        if self._reply is None:
            raise RuntimeError("the generation ended without a reply")
        return self._reply

    @property
    def held_back(self) -> str:
        return self.finished().text[self._sent :]


async def with_timer(items: AsyncIterator, interval_s: float) -> AsyncIterator:
    """`items`, plus a `_TIMER` marker whenever `interval_s` passes without one.

    The pending `__anext__` is never cancelled by the timer (that would abort the manager's task);
    it is cancelled only when this generator is closed early, which ends the manager's stream.
    """
    iterator = aiter(items)
    pending: asyncio.Task | None = None
    try:
        while True:
            pending = asyncio.create_task(_next(iterator))
            while not (await asyncio.wait({pending}, timeout=interval_s))[0]:
                yield _TIMER
            item, pending = pending.result(), None
            if item is _END:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        if hasattr(iterator, "aclose"):
            await iterator.aclose()


async def _next(iterator: AsyncIterator):
    try:
        return await anext(iterator)
    except StopAsyncIteration:
        return _END

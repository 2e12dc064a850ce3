"""Anthropic Messages responses: the message object, its usage, and the SSE event stream.

Streams follow the API's exact event order: message_start, content_block_start, ping,
content_block_delta*, content_block_stop, message_delta (stop reason, cumulative usage),
message_stop. Pings also go out while the model prefills a long prompt (the manager reports
`PrefillProgress`) and whenever nothing else was sent for `ping_interval_s`, so clients and proxies
with idle timeouts keep the connection. A failure after the stream has started is sent as
`event: error`.

Usage: `input_tokens` counts the prompt tokens that were prefilled for this request,
`cache_read_input_tokens` those served from the agent's persistent cache; their sum is the prompt
length. The node writes every prefilled token to its cache, but reports
`cache_creation_input_tokens` as 0 so that the three input counts never add up to more than the prompt.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator

from node.anthropic.errors import api_error_from

STOP_REASONS = {"eos": "end_turn", "length": "max_tokens", "stop": "stop_sequence", "cancelled": "end_turn"}
PING_INTERVAL_S = 5.0
_PING = b'event: ping\ndata: {"type": "ping"}\n\n'
_TIMER = object()
_END = object()


def message_id() -> str:
    return "msg_" + secrets.token_hex(12)


def usage(completion) -> dict:
    u = completion.usage
    return {
        "input_tokens": u.prompt_tokens - u.cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": u.cached_tokens,
        "output_tokens": u.generated_tokens,
    }


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


def message_body(msg_id: str, model: str, completion) -> dict:
    content = [{"type": "text", "text": completion.text}] if completion.text else []
    return {
        **message_shell(msg_id, model, 0),
        "content": content,
        "stop_reason": STOP_REASONS[completion.finish_reason],
        "stop_sequence": completion.stop_sequence,
        "usage": usage(completion),
    }


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def message_events(
    items: AsyncIterator, shell: dict, ping_interval_s: float = PING_INTERVAL_S
) -> AsyncIterator[bytes]:
    """SSE bytes for one streamed message, from the manager's text deltas, progress and Completion."""
    yield sse("message_start", {"type": "message_start", "message": shell})
    yield sse(
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    )
    yield _PING
    completion = None
    try:
        async for item in with_timer(items, ping_interval_s):
            if isinstance(item, str):
                yield sse("content_block_delta", _text_delta(item))
            elif hasattr(item, "finish_reason"):
                completion = item
            else:  # PrefillProgress or the idle timer
                yield _PING
        if completion is None:
            raise RuntimeError("the generation ended without a completion")
    except Exception as e:  # noqa: BLE001 - headers are sent: report it in the stream
        yield sse("error", api_error_from(e).body())
        return
    yield sse("content_block_stop", {"type": "content_block_stop", "index": 0})
    yield sse("message_delta", _message_delta(completion))
    yield sse("message_stop", {"type": "message_stop"})


def _text_delta(text: str) -> dict:
    return {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}


def _message_delta(completion) -> dict:
    delta = {"stop_reason": STOP_REASONS[completion.finish_reason], "stop_sequence": completion.stop_sequence}
    return {"type": "message_delta", "delta": delta, "usage": usage(completion)}


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

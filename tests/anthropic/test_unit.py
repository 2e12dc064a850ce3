"""The Anthropic API layer against a scripted fake manager: parsing, rendering, SSE, errors, gating.

Requests go through the official SDK over httpx's ASGITransport (in-process, no model).
The real server and model are exercised in tests/anthropic/test_api.py and test_server.py.
"""

from __future__ import annotations

import asyncio
import json

import anthropic
import httpx2 as httpx  # the anthropic SDK 2.x is built on httpx2
import pytest
from starlette.applications import Starlette

from node.anthropic.api import anthropic_routes
from node.anthropic.chat import ChatService
from node.anthropic.prompt import agent_id_for
from node.anthropic.responses import with_timer
from node.config import NodeConfig
from node.memory.agent_ids import derived_agent_id
from node.server.guards import caller_id
from tests.anthropic.fakes import FakeManager


def make_app(manager, *, max_tokens=64, max_pending=16, **settings) -> Starlette:
    config = NodeConfig(max_tokens=max_tokens, **settings)
    return Starlette(routes=anthropic_routes(ChatService(manager, config, max_pending)))


def make_client(manager, *, key="k", **settings):
    app = make_app(manager, **settings)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost")
    return anthropic.AsyncAnthropic(api_key=key, base_url="http://localhost", http_client=http, max_retries=0)


@pytest.fixture
def manager():
    return FakeManager()


async def test_create_returns_an_anthropic_message(manager):
    client = make_client(manager)
    message = await client.messages.create(
        model="claude-whatever",
        max_tokens=3,
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        messages=[{"role": "user", "content": "Hi"}],
        metadata={"user_id": "u1"},
        extra_body={"thinking": {"type": "disabled"}, "context_management": {}},
    )
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == "claude-whatever"
    assert message.content[0].text == "Hello there, friend."
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    call = manager.calls[0]
    # The family is the system prompt's, scoped to the caller's key (test_security: prefix probing).
    family = agent_id_for("Be brief.\n\nBe kind.")
    assert call["agent_id"] == derived_agent_id(f"{family}.k", caller_id({"x-api-key": "k"}))
    assert call["params"].max_tokens == 3
    rendered = "".join(chr(t) for t in call["prompt"][1:])
    assert rendered == "<system>Be brief.\n\nBe kind.</><user>Hi</><model>"
    assert message.usage.input_tokens == len(call["prompt"]) and message.usage.cache_read_input_tokens == 0


async def test_resent_conversation_reads_the_cache(manager):
    client = make_client(manager)
    first = [{"role": "user", "content": "Hi"}]
    one = await client.messages.create(model="m", max_tokens=8, messages=first)
    assert one.stop_reason == "end_turn"
    second = first + [
        {"role": "assistant", "content": one.content[0].text},
        {"role": "user", "content": "More"},
    ]
    two = await client.messages.create(model="m", max_tokens=8, messages=second)
    assert two.usage.cache_read_input_tokens >= len(manager.calls[0]["prompt"])
    assert two.usage.input_tokens + two.usage.cache_read_input_tokens == len(manager.calls[1]["prompt"])


async def test_blocks_tools_and_prefill_are_rendered(manager):
    client = make_client(manager)
    await client.messages.create(
        model="m",
        max_tokens=2,
        tools=[{"name": "read", "description": "Read a file", "input_schema": {"type": "object"}}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Read a"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hm", "signature": "s"},
                    {"type": "tool_use", "id": "t1", "name": "read", "input": {"p": "a"}},
                ],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "AAA"}]},
            {"role": "user", "content": "Summarise"},
            {"role": "assistant", "content": "Summary: "},
        ],
    )
    rendered = "".join(chr(t) for t in manager.calls[0]["prompt"][1:])
    assert rendered.startswith("<system># Tools\n\nTo call a tool, reply with one block\n```tool_code\n")
    assert rendered.endswith(
        '## read\nRead a file\nInput schema: {"type": "object"}</>'
        "<user>Read a</>"
        '<model>```tool_code\n{"name": "read", "input": {"p": "a"}}\n```</>'
        "<user>```tool_output\nAAA\n```\n\nSummarise</>"
        "<model>Summary:"
    )


async def test_stream_helper_assembles_text_and_usage(manager):
    client = make_client(manager)
    async with client.messages.stream(
        model="m", max_tokens=8, messages=[{"role": "user", "content": "Hi"}], stop_sequences=["friend"]
    ) as stream:
        texts = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(texts) == final.content[0].text == "Hello there,"
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "friend"
    assert final.usage.input_tokens == len(manager.calls[0]["prompt"]) and final.usage.output_tokens > 0


async def test_sse_event_order_and_pings(manager):
    app = make_app(manager)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as http:
        body = {
            "model": "m",
            "max_tokens": 2,
            "stream": True,
            "messages": [{"role": "user", "content": "Hi"}],
        }
        response = await http.post("/v1/messages?beta=true", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line[7:] for line in response.text.splitlines() if line.startswith("event: ")]
    assert events == [
        "message_start",
        "content_block_start",
        "ping",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    delta = json.loads(response.text.split("event: message_delta\ndata: ")[1].split("\n")[0])
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"]["output_tokens"] == 2


async def test_error_mid_stream_is_an_error_event():
    client = make_client(FakeManager(fail_after=1))
    with pytest.raises(anthropic.APIStatusError, match="api_error"):
        async with client.messages.stream(
            model="m", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        ) as s:
            await s.get_final_message()


async def test_timer_pings_while_the_source_is_silent():
    async def slow():
        await asyncio.sleep(0.35)
        yield "a"

    items = [item async for item in with_timer(slow(), 0.1)]
    assert items[-1] == "a" and len(items) >= 3 and all(not isinstance(i, str) for i in items[:-1])


async def test_invalid_requests_are_400(manager):
    client = make_client(manager)
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
    with pytest.raises(anthropic.BadRequestError, match="image blocks are not supported"):
        await client.messages.create(model="m", max_tokens=4, messages=[{"role": "user", "content": [image]}])
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        await client.messages.create(model="m", max_tokens=0, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.BadRequestError, match="temperature"):
        await client.messages.create(
            model="m",
            max_tokens=4,
            messages=[{"role": "user", "content": "x"}],
            extra_body={"temperature": 3},
        )
    with pytest.raises(anthropic.BadRequestError, match="prompt is too long"):
        await client.messages.create(
            model="m", max_tokens=4, messages=[{"role": "user", "content": "x" * 5000}]
        )
    assert manager.calls == []


async def test_auth_accepts_both_headers(manager):
    with pytest.raises(anthropic.AuthenticationError):
        await make_client(manager, api_key="secret", key="wrong").models.list()
    assert (await make_client(manager, api_key="secret", key="secret").models.list()).data
    legacy = make_client(manager, api_key="secret", key="")
    page = await legacy.models.list(extra_headers={"x-api-key": "secret", "Authorization": ""})
    assert page.data[0].id == "fake-model"


async def test_models_and_count_tokens(manager):
    client = make_client(manager)
    page = await client.models.list()
    assert [m.id for m in page.data] == ["fake-model"]
    assert page.data[0].display_name == "fake-model (scripted)"
    assert (await client.models.retrieve("fake-model")).id == "fake-model"
    with pytest.raises(anthropic.NotFoundError):
        await client.models.retrieve("claude-opus")
    counted = await client.messages.count_tokens(model="m", messages=[{"role": "user", "content": "Hi"}])
    assert counted.input_tokens == len("<user>Hi</><model>") + 1


async def test_oversized_body_is_413(manager):
    client = make_client(manager, max_message_bytes=1000)
    with pytest.raises(anthropic.APIStatusError) as caught:
        await client.messages.create(
            model="m", max_tokens=4, messages=[{"role": "user", "content": "x" * 2000}]
        )
    assert caught.value.status_code == 413


async def test_overload_is_529(manager):
    client = make_client(manager, max_pending=1)
    manager.release.clear()
    first = asyncio.create_task(
        client.messages.create(model="m", max_tokens=1, messages=[{"role": "user", "content": "a"}])
    )
    while not manager.calls:
        await asyncio.sleep(0.01)
    with pytest.raises(anthropic.OverloadedError):
        await client.messages.create(model="m", max_tokens=1, messages=[{"role": "user", "content": "b"}])
    manager.release.set()
    assert (await first).content[0].text == "Hello"

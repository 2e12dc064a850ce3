"""The OpenAI chat completions layer through the official `openai` SDK, in-process against the
scripted fake manager: completions, streams with usage, tool calls, errors, shared caches."""

from __future__ import annotations

import asyncio

import httpx2 as httpx
import openai
import pytest
from starlette.applications import Starlette

from node.anthropic.api import anthropic_routes
from node.anthropic.chat import ChatService
from node.config import NodeConfig
from node.openai.api import openai_routes
from tests.anthropic.fakes import FakeManager
from tests.anthropic.test_unit import make_client as anthropic_client

CALL = '```tool_code\n{"name": "read", "input": {"path": "a.txt"}}\n```'
TOOLS = [{"type": "function", "function": {"name": "read", "parameters": {"type": "object"}}}]


def make_client(manager, *, key="k", max_pending=16, **settings) -> openai.AsyncOpenAI:
    chat = ChatService(manager, NodeConfig(max_tokens=64, **settings), max_pending)
    app = Starlette(routes=[*openai_routes(chat), *anthropic_routes(chat)])
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost")
    return openai.AsyncOpenAI(api_key=key, base_url="http://localhost/v1", http_client=http, max_retries=0)


@pytest.fixture
def manager():
    return FakeManager()


def user(text: str) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


async def test_completion_and_cached_tokens_on_the_next_turn(manager):
    client = make_client(manager)
    one = await client.chat.completions.create(model="gpt-x", messages=user("Hi"), max_tokens=8)
    assert one.object == "chat.completion" and one.model == "gpt-x" and one.id.startswith("chatcmpl-")
    assert one.choices[0].message.content == "Hello there, friend. Bye"
    assert one.choices[0].finish_reason == "stop"
    assert one.usage.prompt_tokens == len(manager.calls[0]["prompt"]) and one.usage.completion_tokens == 4
    assert one.usage.prompt_tokens_details.cached_tokens == 0
    messages = user("Hi") + [
        {"role": "assistant", "content": one.choices[0].message.content},
        {"role": "user", "content": "More"},
    ]
    two = await client.chat.completions.create(model="gpt-x", messages=messages, max_completion_tokens=2)
    assert two.usage.prompt_tokens_details.cached_tokens >= one.usage.prompt_tokens
    assert two.choices[0].finish_reason == "length"


async def test_stream_with_include_usage(manager):
    client = make_client(manager)
    stream = await client.chat.completions.create(
        model="m", messages=user("Hi"), stream=True, stream_options={"include_usage": True}, temperature=1.5
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello there, friend. Bye"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert manager.calls[0]["params"].temperature == 1.5


async def test_an_answer_that_stops_at_once_is_empty_text_not_null(manager):
    manager.scripts = [""]
    empty = await make_client(manager).chat.completions.create(model="m", messages=user("Hi"), max_tokens=8)
    assert empty.choices[0].message.content == "" and empty.choices[0].finish_reason == "stop"


async def test_tool_calls_non_stream_and_stream(manager):
    client = make_client(manager)
    manager.scripts = [CALL, CALL]
    message = (await client.chat.completions.create(model="m", messages=user("read"), tools=TOOLS)).choices[0]
    assert message.finish_reason == "tool_calls" and message.message.content is None
    call = message.message.tool_calls[0]
    assert call.function.name == "read" and call.function.arguments == '{"path": "a.txt"}'
    stream = await client.chat.completions.create(model="m", messages=user("read"), tools=TOOLS, stream=True)
    deltas = [c.choices[0] async for c in stream if c.choices]
    streamed = [d.delta.tool_calls[0] for d in deltas if d.delta.tool_calls]
    assert streamed[0].function.name == "read" and deltas[-1].finish_reason == "tool_calls"
    messages = user("read") + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "file body"},
    ]
    await client.chat.completions.create(model="m", messages=messages, tools=TOOLS)
    rendered = "".join(chr(t) for t in manager.calls[-1]["prompt"][1:])
    assert CALL in rendered and "```tool_output\nfile body\n```" in rendered


async def test_same_conversation_from_both_apis_shares_the_cache(manager):
    # (Two apps here, each with its own conversation index, as if two nodes shared one manager: the
    # families are scoped to the key unless sharing is allowed, tests/server/test_security.py.)
    shared = {"share_cache_across_keys": True}
    await make_client(manager, **shared).chat.completions.create(model="m", messages=user("Hi"), max_tokens=8)
    again = await anthropic_client(manager, **shared).messages.create(
        model="m", max_tokens=8, system="Be brief.", messages=[{"role": "user", "content": "Hi there"}]
    )
    assert manager.calls[0]["agent_id"].split(".")[0] == manager.calls[1]["agent_id"].split(".")[0]
    assert again.usage.cache_read_input_tokens > len("<system>Be brief.</><user>Hi")


async def test_errors_are_openai_shaped(manager):
    client = make_client(manager, api_key="secret", key="wrong")
    with pytest.raises(openai.AuthenticationError) as caught:
        await client.chat.completions.create(model="m", messages=user("Hi"))
    assert caught.value.body["code"] == "invalid_api_key"
    client = make_client(manager, max_message_bytes=500)
    with pytest.raises(openai.APIStatusError) as too_large:
        await client.chat.completions.create(model="m", messages=user("x" * 1000))
    assert too_large.value.status_code == 413 and too_large.value.body["code"] == "request_too_large"
    with pytest.raises(openai.BadRequestError, match="n: this node returns one choice"):
        await make_client(manager).chat.completions.create(model="m", messages=user("Hi"), n=2)
    image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    with pytest.raises(openai.BadRequestError, match="image_url parts are not supported"):
        await make_client(manager).chat.completions.create(
            model="m", messages=[{"role": "user", "content": image}]
        )
    assert manager.calls == []


async def test_models_in_openai_shape(manager):
    client = make_client(manager)
    models = (await client.models.list()).data
    assert [m.id for m in models] == ["fake-model"] and models[0].object == "model"
    assert (await client.models.retrieve("fake-model")).owned_by == "persistent-agent-node"


async def test_admission_is_shared_with_the_messages_api(manager):
    client = make_client(manager, max_pending=1)
    manager.release.clear()
    first = asyncio.create_task(client.chat.completions.create(model="m", messages=user("a")))
    while not manager.calls:
        await asyncio.sleep(0.01)
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="m", messages=user("b"))
    assert caught.value.status_code == 503 and caught.value.body["code"] == "overloaded"
    manager.release.set()
    assert (await first).choices[0].message.content

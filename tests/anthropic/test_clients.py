"""What real clients send, against the scripted fake manager: Claude Code's request shape and its
volatile parts, sessions, interleaved conversations, honest stop reasons, tool calls."""

from __future__ import annotations

import json

import httpx2 as httpx
import pytest

from node.anthropic.tools import CallWatcher, GemmaTools, LlamaTools
from tests.anthropic import claude_code
from tests.anthropic.fakes import FakeManager
from tests.anthropic.test_unit import make_app, make_client

READ = [{"name": "read", "description": "Read a file", "input_schema": {"type": "object"}}]
CALL = '```tool_code\n{"name": "read", "input": {"path": "a.txt"}}\n```'


def http(manager, **settings) -> httpx.AsyncClient:
    app = make_app(manager, **settings)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost")


async def post_claude_code(client, run: str, session: str, messages: list[dict]) -> list[tuple[str, dict]]:
    response = await client.post(
        "/v1/messages?beta=true",
        json=claude_code.body(run, session, messages),
        headers=claude_code.headers(session),
    )
    assert response.status_code == 200, response.text
    return claude_code.events(response.text)


def rendered(call: dict) -> str:
    return "".join(chr(t) for t in call["prompt"][1:])


async def test_claude_code_request_is_accepted_and_its_volatile_parts_do_not_split_the_cache():
    manager = FakeManager()
    async with http(manager) as client:
        first = await post_claude_code(client, "7b2", "s-1", claude_code.first_messages("say hi"))
        # A second `claude -p`: another billing header and session, the same prompt.
        second = await post_claude_code(client, "016", "s-2", claude_code.first_messages("say hi"))
    text = rendered(manager.calls[0])
    assert "billing-header" not in text and "cc_version" not in text
    assert "Today's date is 2026-12-02" in text
    # The mid-conversation system message stays in place: after the user's prompt.
    assert text.index("say hi") < text.index("<system>\nAgent types available")
    assert [e for e, _ in first][-2:] == ["message_delta", "message_stop"]
    delta = next(d for e, d in first if e == "message_delta")
    assert delta["delta"]["stop_reason"] == "end_turn"
    prompt = len(manager.calls[1]["prompt"])
    assert claude_code.final_usage(second)["cache_read_input_tokens"] == prompt - 1
    assert manager.calls[0]["agent_id"] != manager.calls[1]["agent_id"]  # sessions apart


async def test_a_session_continues_its_own_history():
    manager = FakeManager()
    async with http(manager) as client:
        messages = claude_code.first_messages("say hi")
        first = await post_claude_code(client, "7b2", "s-1", messages)
        other = await post_claude_code(client, "7b2", "s-2", claude_code.first_messages("say bye"))
        messages += [
            {"role": "assistant", "content": claude_code.reply_text(first)},
            {"role": "user", "content": "and again"},
        ]
        follow_up = await post_claude_code(client, "016", "s-1", messages)
    assert manager.calls[2]["agent_id"] == manager.calls[0]["agent_id"] != manager.calls[1]["agent_id"]
    assert claude_code.final_usage(follow_up)["cache_read_input_tokens"] >= len(manager.calls[0]["prompt"])
    assert claude_code.final_usage(other)["cache_read_input_tokens"] > 0  # forked at the shared prefix


def test_session_id_from_metadata_user_id():
    from node.anthropic.request import session_id

    user_id = json.dumps({"device_id": "d", "session_id": "abc"})
    assert session_id({"metadata": {"user_id": user_id}}, {}) == "abc"
    assert session_id({"metadata": {"user_id": "plain"}}, {}) is None
    assert session_id({}, {"x-claude-code-session-id": "h"}) == "h"


async def test_interleaved_conversations_reuse_their_own_previous_prompt():
    """Three conversations under one system prompt, one turn each in turn, no session ids."""
    manager = FakeManager()
    client = make_client(manager)
    conversations = [[{"role": "user", "content": f"Question {name} " * 10}] for name in "ABC"]
    previous: list[int | None] = [None, None, None]
    shares = []
    for _ in range(3):
        for i, messages in enumerate(conversations):
            reply = await client.messages.create(
                model="m", max_tokens=8, system="Shared system prompt. " * 20, messages=messages
            )
            if previous[i] is not None:
                shares.append(reply.usage.cache_read_input_tokens / previous[i])
            previous[i] = reply.usage.input_tokens + reply.usage.cache_read_input_tokens
            messages += [
                {"role": "assistant", "content": reply.content[0].text},
                {"role": "user", "content": f"Next question for {i}."},
            ]
    assert min(shares) >= 0.95, shares


async def test_stop_reasons_are_honest():
    manager = FakeManager(script="one two three four five six seven eight")
    client = make_client(manager, max_tokens=3)
    capped = await client.messages.create(
        model="m", max_tokens=100, messages=[{"role": "user", "content": "x"}]
    )
    own = await client.messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "y"}])
    assert capped.stop_reason == "end_turn" and capped.usage.model_extra["server_output_cap"] == 3
    assert own.stop_reason == "max_tokens" and "server_output_cap" not in (own.usage.model_extra or {})


async def test_tool_call_in_gemma_convention_becomes_tool_use():
    manager = FakeManager()
    manager.scripts = [f"Let me look.\n{CALL}\nand more text"]
    client = make_client(manager)
    message = await client.messages.create(
        model="m", max_tokens=50, tools=READ, messages=[{"role": "user", "content": "read a.txt"}]
    )
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[0].text == "Let me look."
    call = message.content[1]
    assert call.name == "read" and call.input == {"path": "a.txt"} and call.id.startswith("toolu_")


async def test_streamed_tool_call_is_input_json_delta_and_its_result_renders_back():
    manager = FakeManager()
    manager.scripts = [f"Reading.\n{CALL}"]
    client = make_client(manager)
    messages = [{"role": "user", "content": "read a.txt"}]
    async with client.messages.stream(model="m", max_tokens=50, tools=READ, messages=messages) as stream:
        kinds = [(e.type, getattr(getattr(e, "delta", None), "type", None)) async for e in stream]
        final = await stream.get_final_message()
    assert ("content_block_delta", "input_json_delta") in kinds
    assert final.stop_reason == "tool_use" and final.content[-1].input == {"path": "a.txt"}
    call = final.content[-1]
    messages += [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in final.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "hello"}]},
    ]
    after = await client.messages.create(model="m", max_tokens=50, tools=READ, messages=messages)
    text = rendered(manager.calls[1])
    assert CALL in text and "```tool_output\nhello\n```" in text
    # The call is rendered as the model wrote it, so the cache serves the whole first turn.
    assert after.usage.cache_read_input_tokens >= len(manager.calls[0]["prompt"])


def test_llama_convention_and_the_watcher():
    llama = LlamaTools()
    parsed = llama.parse('<|python_tag|>{"name": "read", "parameters": {"path": "x"}}<|eom_id|>')
    assert parsed.text == "" and parsed.calls[0].name == "read" and parsed.calls[0].input == {"path": "x"}
    assert llama.parse('{"name": "read", "parameters": {}}').calls[0].input == {}
    assert llama.parse("plain {text}").calls == ()
    assert GemmaTools().parse("```tool_code\nread(path='a')\n```").calls[0].input == {"path": "a"}
    watcher = CallWatcher(GemmaTools(), enabled=True)
    assert watcher.feed("Hi ``") == "Hi " and not watcher.complete()
    assert watcher.feed("`tool_code\n{}") == "" and watcher.feed("\n```") == ""
    assert watcher.complete()


@pytest.mark.parametrize("header", [{"anthropic-version": "2023-06-01"}, {}])
async def test_models_shape_follows_the_anthropic_version_header(header):
    async with http(FakeManager()) as client:
        body = (await client.get("/v1/models", headers=header)).json()
    if header:
        assert body["data"][0]["type"] == "model" and body["has_more"] is False
    else:
        assert body["object"] == "list" and body["data"][0]["object"] == "model"

"""A real `python -m node serve` on the tiny random-weight GGUF, through the official `anthropic`
SDK and raw HTTP: cache reads across a restart, a request of Claude Code's shape with a follow-up
turn and a second run, and three interleaved conversations under one system prompt."""

from __future__ import annotations

import uuid

import anthropic
import httpx
import pytest

from tests.a2a_node import NodeProcess, start_tiny_node
from tests.anthropic import claude_code

API_KEY = "test-key"
GREEDY = {"temperature": 0.0}  # the SDK 2.x `create` has no temperature argument


@pytest.fixture(scope="module")
def node(tiny_gguf, tmp_path_factory):
    process = start_tiny_node(
        tiny_gguf,
        tmp_path_factory.mktemp("tiny-node"),
        "--api-key",
        API_KEY,
        "--skills",
        "technical_analysis",
        "--max-tokens",
        "16",
    )
    yield process
    process.stop()


def sdk(node: NodeProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=node.url, api_key=API_KEY, max_retries=0, timeout=300)


def prompt_tokens(message) -> int:
    return message.usage.input_tokens + message.usage.cache_read_input_tokens


def turn(node, system: str, messages: list[dict]) -> anthropic.types.Message:
    return sdk(node).messages.create(
        model="claude-x", max_tokens=8, system=system, messages=messages, extra_body=GREEDY
    )


def test_conversation_reads_the_cache_across_a_restart(node):
    system = f"You are a helpful assistant. Session {uuid.uuid4()}."
    messages = [{"role": "user", "content": "Name a fruit."}]
    first = turn(node, system, messages)
    assert first.usage.cache_read_input_tokens == 0 and first.stop_reason in ("end_turn", "max_tokens")
    node.restart()  # the agent comes back from disk
    messages += [{"role": "assistant", "content": first.content[0].text if first.content else ""}]
    messages += [{"role": "user", "content": "Name a vegetable."}]
    second = turn(node, system, messages)
    assert second.usage.cache_read_input_tokens >= prompt_tokens(first)


def post(node, run: str, session: str, messages: list[dict]) -> list[tuple[str, dict]]:
    response = httpx.post(
        f"{node.url}/v1/messages?beta=true",
        json=claude_code.body(run, session, messages),
        headers=claude_code.headers(session, API_KEY),
        timeout=300,
    )
    assert response.status_code == 200, response.text
    return claude_code.events(response.text)


def test_claude_code_shape_follow_up_and_second_run(node):
    session = str(uuid.uuid4())
    messages = claude_code.first_messages("say hi")
    first = post(node, "7b2", session, messages)
    usage = claude_code.final_usage(first)
    first_prompt = usage["input_tokens"] + usage["cache_read_input_tokens"]
    stop = next(d for e, d in first if e == "message_delta")["delta"]["stop_reason"]
    assert stop == "end_turn"  # the node's cap (16) is not the client's max_tokens (32000)
    messages += [
        {"role": "assistant", "content": claude_code.reply_text(first)},
        {"role": "user", "content": "and now?"},
    ]
    follow_up = claude_code.final_usage(post(node, "7b2", session, messages))
    assert follow_up["cache_read_input_tokens"] >= first_prompt
    # A second `claude -p`: a new billing header and session, the same prompt: all but one token read.
    rerun = claude_code.final_usage(
        post(node, "016", str(uuid.uuid4()), claude_code.first_messages("say hi"))
    )
    assert rerun["cache_read_input_tokens"] == first_prompt - 1 and rerun["input_tokens"] == 1


def test_three_interleaved_conversations_reuse_their_previous_prompt(node):
    system = f"Shared system prompt {uuid.uuid4()}. " + "Answer in one word. " * 10
    conversations = [[{"role": "user", "content": f"Conversation {name}: name a colour."}] for name in "ABC"]
    previous: list[int | None] = [None] * 3
    shares = []
    for round_ in range(3):
        for i, messages in enumerate(conversations):
            reply = turn(node, system, messages)
            if previous[i] is not None:
                shares.append(reply.usage.cache_read_input_tokens / previous[i])
            previous[i] = prompt_tokens(reply)
            text = reply.content[0].text if reply.content else ""
            messages += [
                {"role": "assistant", "content": text},
                {"role": "user", "content": f"And {round_}?"},
            ]
    print(f"interleaved reuse of the previous prompt: min {min(shares):.3f}, shares {shares}")
    assert min(shares) >= 0.95, shares

"""The Anthropic Messages API of a real node (`python -m node serve`, default model) through the
official `anthropic` SDK: create, stream, count_tokens, models, errors, and a conversation whose
later turns are served from the persistent cache, also after the server restarts.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import anthropic
import httpx
import pytest

from tests.a2a_node import NodeProcess
from tests.conftest import free_port

pytestmark = pytest.mark.slow

API_KEY = "test-key"
MAX_MESSAGE_BYTES = 100_000
GREEDY = {"temperature": 0.0}  # the SDK 2.x `create` has no temperature argument


def start_node(cache_dir: Path) -> NodeProcess:
    """`python -m node serve` on a free port with this API's key and size limit."""
    extra = (
        "--api-key",
        API_KEY,
        "--skills",
        "technical_analysis",
        "--max-message-bytes",
        str(MAX_MESSAGE_BYTES),
    )
    return NodeProcess(free_port(), cache_dir, *extra).start()


def sdk_client(node: NodeProcess, api_key: str = API_KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=node.url, api_key=api_key, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    folder = tmp_path_factory.mktemp("anthropic-node")
    process = start_node(folder / "cache")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(node) -> anthropic.Anthropic:
    return sdk_client(node)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_create(client):
    message = client.messages.create(
        model="claude-node-test",
        max_tokens=12,
        system="You answer geography questions.",
        messages=user("What is the capital of France?"),
        metadata={"user_id": "tester"},
        extra_body={**GREEDY, "thinking": {"type": "disabled"}, "output_config": {"effort": "low"}},
    )
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == "claude-node-test"
    assert message.content[0].type == "text" and message.content[0].text.strip()
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    usage = message.usage
    assert 0 < usage.output_tokens <= 12 and usage.input_tokens > 10
    assert usage.cache_creation_input_tokens == 0 and usage.cache_read_input_tokens >= 0


def test_stream_helper_assembles_the_message(client):
    with client.beta.messages.stream(  # the beta client posts to /v1/messages?beta=true, like Claude Code
        model="claude-opus-4-1",
        max_tokens=10,
        system=[{"type": "text", "text": "You complete lists."}],
        messages=user("Name three colours."),
        extra_body=GREEDY,
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == final.content[0].text
    assert final.stop_reason in ("end_turn", "max_tokens") and 0 < final.usage.output_tokens <= 10
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens > 10


def test_count_tokens_matches_the_prompt_a_create_reports(client):
    request = {"model": "any", "system": f"Counter {uuid.uuid4()}", "messages": user("Count these tokens.")}
    counted = client.messages.count_tokens(**request).input_tokens
    usage = client.messages.create(**request, max_tokens=1, extra_body=GREEDY).usage
    assert counted == usage.input_tokens + usage.cache_read_input_tokens > 10


def test_models_list_and_retrieve(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["gemma-3-270m"] and "gemma-3-270m" in models[0].display_name
    assert client.models.retrieve("gemma-3-270m").id == "gemma-3-270m"
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("claude-no-such-model")


def test_errors_map_to_sdk_exceptions(node, client):
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError, match="image blocks are not supported"):
        client.messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": [image]}])
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        client.messages.create(model="m", max_tokens=0, messages=user("hi"))
    with pytest.raises(anthropic.AuthenticationError) as refused:
        sdk_client(node, api_key="wrong").messages.create(model="m", max_tokens=8, messages=user("hi"))
    assert (
        refused.value.body["type"] == "error"
        and refused.value.body["error"]["type"] == "authentication_error"
    )
    with pytest.raises(anthropic.APIStatusError) as too_large:
        client.messages.create(model="m", max_tokens=8, messages=user("x" * (MAX_MESSAGE_BYTES + 1)))
    assert too_large.value.status_code == 413 and too_large.value.body["error"]["type"] == "request_too_large"


def test_legacy_x_api_key_header_is_accepted(node):
    response = httpx.get(
        f"{node.url}/v1/models", headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}
    )
    assert response.status_code == 200 and response.json()["data"][0]["id"] == "gemma-3-270m"


def _turn(client, system: str, messages: list[dict]) -> anthropic.types.Message:
    return client.messages.create(
        model="claude-x", max_tokens=8, system=system, messages=messages, extra_body=GREEDY
    )


def _prompt_tokens(message) -> int:
    return message.usage.input_tokens + message.usage.cache_read_input_tokens


def test_three_turns_reuse_the_cache_across_a_restart(tmp_path):
    node = start_node(tmp_path / "cache")
    system = f"You are a helpful assistant. Session {uuid.uuid4()}."
    messages = user("Name a fruit.")
    try:
        first = _turn(sdk_client(node), system, messages)
        assert first.usage.cache_read_input_tokens == 0
        messages += [{"role": "assistant", "content": first.content[0].text}, *user("Name a vegetable.")]
        second = _turn(sdk_client(node), system, messages)
    finally:
        node.stop()
    assert second.usage.cache_read_input_tokens >= _prompt_tokens(first)
    assert second.usage.input_tokens < _prompt_tokens(first)  # only the new turn was prefilled

    node.start()  # a fresh process on the same cache directory: the agent comes back from disk
    try:
        messages += [{"role": "assistant", "content": second.content[0].text}, *user("Name a colour.")]
        third = _turn(sdk_client(node), system, messages)
    finally:
        node.stop()
    assert third.usage.cache_read_input_tokens >= _prompt_tokens(second)
    assert third.usage.input_tokens < _prompt_tokens(first)

"""A real `python -m node serve` on the tiny random-weight GGUF through the official `openai` SDK:
completions, streams with usage, the models list, and cached prompt tokens across a restart."""

from __future__ import annotations

import uuid

import openai
import pytest

from tests.a2a_node import start_tiny_node

API_KEY = "test-key"


@pytest.fixture(scope="module")
def node(tiny_gguf, tmp_path_factory):
    process = start_tiny_node(
        tiny_gguf,
        tmp_path_factory.mktemp("tiny-openai-node"),
        "--api-key",
        API_KEY,
        "--skills",
        "technical_analysis",
        "--max-tokens",
        "16",
    )
    yield process
    process.stop()


def client(node, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.url}/v1", api_key=key, max_retries=0, timeout=300)


def test_models_and_auth(node):
    models = client(node).models.list().data
    assert len(models) == 1 and models[0].object == "model"
    with pytest.raises(openai.AuthenticationError):
        client(node, "wrong").models.list()


def test_stream_with_usage(node):
    stream = client(node).chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "Say something."}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=6,
        temperature=0,
    )
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens <= 6 and chunks[-1].usage.prompt_tokens > 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_cached_tokens_across_a_restart(node):
    messages = [
        {"role": "system", "content": f"You are terse. {uuid.uuid4()}"},
        {"role": "user", "content": "Name a fruit."},
    ]
    first = client(node).chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    node.restart()
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content or ""},
        {"role": "user", "content": "Another one."},
    ]
    second = client(node).chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens

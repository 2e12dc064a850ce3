"""The node as an MCP server, driven by the `mcp` SDK's own client over both transports.

A real node process on the tiny model: streamable HTTP at /mcp behind the API key, and stdio through
`python -m node mcp`. Each lists the skills as tools and the contexts as resources; a second call
with the context id the first returned continues the conversation from the agent's cache.
"""

from __future__ import annotations

import json
import sys

import httpx2
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from tests.a2a_node import REPO, start_tiny_node

KEY = "mcp-test-key"
SKILLS = "technical_analysis,business_analysis"
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def node(tiny_gguf, tmp_path_factory):
    process = start_tiny_node(
        tiny_gguf, tmp_path_factory.mktemp("mcp-node"), "--skills", SKILLS, "--api-key", KEY
    )
    yield process
    process.stop()


async def two_turns(client: Client) -> tuple[dict, dict]:
    first = await client.call_tool("technical_analysis", {"question": "Should the cat sit on the mat?"})
    assert not first.is_error, first
    context_id = first.structured_content["context_id"]
    second = await client.call_tool(
        "technical_analysis", {"question": "And the dog?", "context_id": context_id}
    )
    assert not second.is_error, second
    return first.structured_content, second.structured_content


def assert_second_reuses_first(first: dict, second: dict) -> None:
    assert second["context_id"] == first["context_id"]
    # The whole first prompt is read from the agent's cache, not prefilled again.
    assert second["usage"]["cachedTokens"] >= first["usage"]["promptTokens"] > 0


async def test_streamable_http_lists_and_calls_the_skills_behind_the_key(node):
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=TIMEOUT_S)
    async with http, Client(streamable_http_client(f"{node.url}/mcp", http_client=http)) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert set(tools) == set(SKILLS.split(","))
        assert set(tools["technical_analysis"].input_schema["properties"]) == {"question", "context_id"}
        assert tools["technical_analysis"].input_schema["required"] == ["question"]

        first, second = await two_turns(client)
        assert_second_reuses_first(first, second)

        listed = json.loads((await client.read_resource("node://contexts")).contents[0].text)
        assert first["context_id"] in {row["context_id"] for row in listed}
        one = await client.read_resource(f"node://contexts/technical_analysis/{first['context_id']}")
        turns = json.loads(one.contents[0].text)["messages"]
        asked = [m["content"] for m in turns if m["role"] == "user"]
        assert asked == ["Should the cat sit on the mat?", "And the dog?"]


async def test_streamable_http_refuses_a_client_without_the_key(node):
    async with httpx2.AsyncClient(timeout=30) as http:
        response = await http.post(
            f"{node.url}/mcp",
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            headers={"Accept": "application/json, text/event-stream"},
        )
    assert response.status_code == 401


async def test_stdio_lists_and_calls_the_skills(tiny_gguf, tmp_path):
    params = StdioServerParameters(
        command=sys.executable,
        args=[
            "-m",
            "node",
            "mcp",
            "--model",
            str(tiny_gguf),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--skills",
            SKILLS,
        ],
        env={"NODE_MODEL_CACHE": str(tmp_path / "models")},
        cwd=str(REPO),
    )
    async with Client(params, read_timeout_seconds=TIMEOUT_S) as client:
        assert {tool.name for tool in (await client.list_tools()).tools} == set(SKILLS.split(","))
        first, second = await two_turns(client)
        assert_second_reuses_first(first, second)
        templates = (await client.list_resource_templates()).resource_templates
        assert [t.uri_template for t in templates] == ["node://contexts/{skill}/{context_id}"]

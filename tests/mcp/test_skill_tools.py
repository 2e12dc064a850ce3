"""Skills as MCP clients (`--mcp-server`): a model's tool call goes to a real MCP server.

The model is scripted (the tiny and default models do not call tools): its first reply is a Gemma
```tool_code block, its second the answer. The MCP server is the SDK's own, on uvicorn, over real
HTTP; the skill connects to it with the SDK's client, as `--mcp-server URL` makes it do.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from mcp.server.mcpserver import MCPServer

from node.a2a.executor import SkillRuntime
from node.a2a.skill_calls import ask_skill
from node.config import NodeConfig
from node.mcp.tools import McpServerUnavailable, skill_tools
from skills import TechnicalAnalysisExecutor
from tests.a2a_node import start_tiny_node
from tests.anthropic.fakes import FakeEngine, FakeManager
from tests.conftest import free_port

CALL = '```tool_code\n{"name": "add", "input": {"a": 2, "b": 3}}\n```'
ANSWER = "The sum is 5."


class ScriptedEngine(FakeEngine):
    info = SimpleNamespace(name="scripted", folder="/nonexistent", instruction_tuned=True)
    prompt_format = SimpleNamespace(stop=(), repetition_penalty=None)

    def decode(self, tokens: list[int]) -> str:
        return "".join(chr(t) for t in tokens if t > 1)


class ScriptedManager(FakeManager):
    def __init__(self, *replies: str) -> None:
        super().__init__()
        self.engine = ScriptedEngine()
        self.scripts = list(replies)

    async def metadata(self, agent_id: str) -> dict | None:
        return None


@pytest.fixture
def tool_server():
    """An MCP server with one tool, `add`, that records its calls (uvicorn on its own thread)."""
    calls = []
    server = MCPServer("calculator")

    @server.tool(description="Add two integers.")
    def add(a: int, b: int) -> int:
        calls.append((a, b))
        return a + b

    port = free_port()
    http = uvicorn.Server(uvicorn.Config(server.streamable_http_app(), port=port, log_level="warning"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not http.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the MCP tool server did not start"
        time.sleep(0.05)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}/mcp", calls=calls)
    http.should_exit = True
    thread.join(timeout=30)


async def test_a_scripted_tool_call_goes_to_the_mcp_server_and_its_result_back_to_the_model(tool_server):
    manager = ScriptedManager(CALL, ANSWER)
    runtime = SkillRuntime(NodeConfig(skills=("technical_analysis",)), manager)
    executor = TechnicalAnalysisExecutor(runtime)

    async with skill_tools(runtime, (tool_server.url,)):
        assert "## add\nAdd two integers." in executor.instructions(manager.engine)
        answer = await ask_skill(runtime, executor, "What is 2 + 3?")

    assert tool_server.calls == [(2, 3)]
    assert answer.text == ANSWER  # the call itself is not part of the answer
    first, second = (manager.engine.decode(call["prompt"]) for call in manager.calls)
    assert "## add" in first and "What is 2 + 3?" in first
    assert second.startswith(first)  # the second round continues the first: its cache serves it
    assert second.endswith(f"<model>{CALL}</><user>```tool_output\n5\n```</><model>")
    assert runtime.tools is None  # disconnected when the node stops


async def test_an_unreachable_mcp_server_stops_the_start_with_its_url():
    runtime = SkillRuntime(NodeConfig(skills=("technical_analysis",)), ScriptedManager())
    url = f"http://127.0.0.1:{free_port()}/mcp"
    with pytest.raises(McpServerUnavailable, match=url):
        async with skill_tools(runtime, (url,)):
            pass


def test_serve_with_mcp_server_lists_its_tools_and_answers(tool_server, tiny_gguf, tmp_path):
    node = start_tiny_node(
        tiny_gguf, tmp_path, "--skills", "technical_analysis", "--mcp-server", tool_server.url
    )
    try:
        state = httpx.get(f"{node.url}/dashboard/state", timeout=30).json()
        assert state["mcp_tools"] == [
            {"name": "add", "description": "Add two integers.", "server": tool_server.url}
        ]
        asked = {"skill": "technical_analysis", "question": "What is 2 + 3?"}
        answer = httpx.post(f"{node.url}/dashboard/ask", json=asked, timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["cachedTokens"] > 0  # the base prefix, tools described, was cached
    finally:
        node.stop()

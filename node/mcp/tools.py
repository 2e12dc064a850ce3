"""The skills as MCP clients: the tools of the MCP servers named by `--mcp-server URL`.

`McpTools` connects to each server (streamable HTTP, the `mcp` SDK's `Client`) at start-up and lists
its tools. A skill's instructions then describe them in the model family's tool convention
(`node.anthropic.tools`: Gemma's ```tool_code block, Llama's <|python_tag|>), and a turn runs in
rounds: when the model writes a complete call, generation stops there, the call goes to the
server that offers the tool, and the call and its result are appended to the conversation as the
model's turn and a tool-output turn; the model continues from there, its cache holding everything
before. At most `MAX_ROUNDS` calls per turn; a tool that fails answers with its error, which the
model reads like any result.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import TextContent

from node.anthropic.request import ToolCall, ToolResult, ToolSpec
from node.anthropic.tools import CallWatcher, tool_format
from node.errors import NodeError

logger = logging.getLogger(__name__)
MAX_ROUNDS = 4
TOOL_TIMEOUT_S = 120.0


class McpServerUnavailable(NodeError):
    """A configured MCP server could not be reached or listed at start-up."""


@asynccontextmanager
async def skill_tools(runtime, urls: tuple[str, ...]) -> AsyncIterator[None]:
    """`runtime.tools` connected to the MCP servers at `urls` meanwhile (nothing when none)."""
    if not urls:
        yield
        return
    tools = McpTools(urls)
    await tools.start()
    runtime.tools = tools
    try:
        yield
    finally:
        runtime.tools = None
        await tools.close()


class McpTools:
    """Tool name -> the MCP client of the server that offers it (the first server wins a name)."""

    def __init__(self, urls: tuple[str, ...], headers: dict[str, str] | None = None) -> None:
        self.urls = urls
        self.headers = headers or {}
        self.specs: tuple[ToolSpec, ...] = ()
        self.servers: dict[str, str] = {}  # tool name -> the URL of the server offering it
        self._owners: dict[str, Client] = {}
        self._stack = AsyncExitStack()

    async def start(self) -> None:
        specs = []
        for url in self.urls:
            try:
                client = await self._connect(url)
                listed = (await client.list_tools()).tools
            except Exception as e:  # the SDK's task groups wrap the cause in an exception group
                await self.close()
                cause = _leaf(e)
                raise McpServerUnavailable(f"MCP server {url}: {type(cause).__name__}: {cause}") from e
            for tool in listed:
                if tool.name in self._owners:
                    logger.warning("MCP tool %r of %s hidden by an earlier server's", tool.name, url)
                    continue
                self._owners[tool.name], self.servers[tool.name] = client, url
                specs.append(ToolSpec(tool.name, tool.description or "", dict(tool.input_schema or {})))
            logger.info("MCP server %s: tools %s", url, ", ".join(t.name for t in listed) or "(none)")
        self.specs = tuple(specs)

    async def close(self) -> None:
        await self._stack.aclose()

    async def _connect(self, url: str) -> Client:
        http = await self._stack.enter_async_context(
            httpx2.AsyncClient(headers=self.headers, timeout=TOOL_TIMEOUT_S)
        )
        client = Client(streamable_http_client(url, http_client=http), read_timeout_seconds=TOOL_TIMEOUT_S)
        return await self._stack.enter_async_context(client)

    # ---- what a skill's turn uses ----------------------------------------------------------
    def instructions(self, engine) -> str:
        """The tools, described in the model family's convention ('' when there are none)."""
        return tool_format(engine).instructions(self.specs) if self.specs else ""

    def watcher(self, engine) -> CallWatcher:
        return CallWatcher(tool_format(engine), enabled=bool(self.specs))

    def first_call(self, engine, text: str) -> ToolCall | None:
        calls = tool_format(engine).parse(text).calls if self.specs else ()
        return calls[0] if calls else None

    async def exchange(self, engine, call: ToolCall) -> list[dict]:
        """The call as the model's turn and its result as the next user turn, in the convention."""
        result = await self.call(call)
        convention = tool_format(engine)
        return [
            {"role": "assistant", "content": convention.call_text(call)},
            {"role": "user", "content": convention.result_text(result)},
        ]

    async def call(self, call: ToolCall) -> ToolResult:
        client = self._owners.get(call.name)
        if client is None:
            return ToolResult(call.id, f"unknown tool {call.name!r}; tools: {', '.join(self._owners)}", True)
        try:
            result = await client.call_tool(call.name, call.input)
        except (MCPError, httpx2.HTTPError, OSError) as e:
            logger.warning("MCP tool %s failed: %s", call.name, e)
            return ToolResult(call.id, f"{type(e).__name__}: {e}", True)
        texts = [block.text for block in result.content if isinstance(block, TextContent)]
        text = "\n".join(texts) if texts else json.dumps(result.structured_content)
        return ToolResult(call.id, text, bool(result.is_error))


def _leaf(error: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error

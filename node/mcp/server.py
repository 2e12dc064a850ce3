"""The node as an MCP server (the official `mcp` SDK): each skill a tool, the contexts resources.

A skill's tool takes a question and an optional `context_id`; it answers with the reply, the
context id (new when none was given) and the turn's usage. Calling it again with that context id
continues the same persistent conversation, so the follow-up reads the earlier turns from the
agent's cache (`usage.cachedTokens`). Resources: `node://contexts` lists every agent the node
keeps; `node://contexts/{skill}/{context_id}` is one skill conversation's turns.

`create_app` serves it over streamable HTTP at `/mcp` (behind the API key); `python -m node mcp`
over stdio.
"""

from __future__ import annotations

import asyncio
import json

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from pydantic import BaseModel

from node.a2a.executor import SkillExecutor, SkillRuntime
from node.a2a.skill_calls import SkillCallError, ask_skill, contexts, conversation
from node.server.guards import Overloaded

SERVER_NAME = "persistent-agent-node"
INSTRUCTIONS = (
    "Each tool is one of the node's skills, an agent with a persistent KV cache. Pass the "
    "context_id a tool returned to ask a follow-up in the same conversation: its earlier turns "
    "are read from cache, not recomputed."
)


class SkillReply(BaseModel):
    skill: str
    context_id: str
    answer: str
    finish_reason: str
    usage: dict
    reports: list[str] = []


def build_mcp_server(runtime: SkillRuntime, executors: dict[str, SkillExecutor]) -> MCPServer:
    server = MCPServer(SERVER_NAME, instructions=INSTRUCTIONS)
    for skill_id, executor in executors.items():
        server.add_tool(
            _skill_tool(runtime, executor),
            name=skill_id,
            title=skill_id.replace("_", " ").capitalize(),
            description=f"{executor.system_prompt} (context_id: continue an earlier conversation)",
        )
    _add_resources(server, runtime)
    return server


def _skill_tool(runtime: SkillRuntime, executor: SkillExecutor):
    async def ask(question: str, context_id: str | None = None) -> SkillReply:
        try:
            answer = await ask_skill(runtime, executor, question, context_id)
        except SkillCallError as e:
            raise ToolError(str(e)) from e
        except Overloaded as e:
            raise ToolError(f"overloaded: {e.message}") from e
        return SkillReply(
            skill=answer.skill,
            context_id=answer.context_id,
            answer=answer.text,
            finish_reason=answer.finish_reason,
            usage=answer.usage,
            reports=list(answer.reports),
        )

    return ask


def _add_resources(server: MCPServer, runtime: SkillRuntime) -> None:
    @server.resource(
        "node://contexts",
        name="contexts",
        description="every agent in memory or on disk: skill, context id, tokens, bytes, last use",
        mime_type="application/json",
    )
    async def all_contexts() -> str:
        rows = await asyncio.to_thread(contexts, runtime.require_manager(), runtime.config.skills)
        return json.dumps(rows)

    @server.resource(
        "node://contexts/{skill}/{context_id}",
        name="context",
        description="one skill conversation: its agent, tokens cached and turns",
        mime_type="application/json",
    )
    async def one_context(skill: str, context_id: str) -> str:
        try:
            return json.dumps(await conversation(runtime, skill, context_id))
        except SkillCallError as e:
            raise ResourceError(str(e)) from e

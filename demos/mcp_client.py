"""An MCP client session with a node: list the tools and resources, ask a skill, ask a follow-up.

    .venv/bin/python demos/mcp_client.py http://127.0.0.1:8000/mcp [--key KEY]
    .venv/bin/python demos/mcp_client.py stdio            # starts `python -m node mcp` itself

The follow-up passes the context id the first call returned, so it continues the same persistent
conversation: its usage shows the first turn's prompt read from cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import httpx2
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

QUESTIONS = (
    "Should we cache LLM prompts on disk or recompute them on every request?",
    "What are the risks of the disk approach?",
)


def client_for(target: str, key: str | None) -> tuple[Client, httpx2.AsyncClient | None]:
    if target == "stdio":
        params = StdioServerParameters(command=sys.executable, args=["-m", "node", "mcp"])
        return Client(params, read_timeout_seconds=900), None
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=900)
    return Client(streamable_http_client(target, http_client=http)), http


async def session(target: str, key: str | None, skill: str) -> None:
    client, http = client_for(target, key)
    async with client:
        tools = (await client.list_tools()).tools
        print("tools:", ", ".join(f"{t.name}({', '.join(t.input_schema['properties'])})" for t in tools))
        resources = (await client.list_resources()).resources
        templates = (await client.list_resource_templates()).resource_templates
        print("resources:", [str(r.uri) for r in resources], [t.uri_template for t in templates])
        context_id = None
        for question in QUESTIONS:
            arguments = {"question": question} | ({"context_id": context_id} if context_id else {})
            reply = (await client.call_tool(skill, arguments)).structured_content
            context_id = reply["context_id"]
            print(f"\n> {skill}({json.dumps(arguments)})")
            print(reply["answer"].strip())
            print("usage:", json.dumps(reply["usage"]))
        turns = await client.read_resource(f"node://contexts/{skill}/{context_id}")
        context = json.loads(turns.contents[0].text)
        print(
            f"\ncontext {context_id}: {context['tokens']} tokens cached, {len(context['messages'])} messages"
        )
    if http is not None:
        await http.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="the node's /mcp URL, or 'stdio'")
    parser.add_argument("--key", default=None, help="the node's API key")
    parser.add_argument("--skill", default="technical_analysis")
    args = parser.parse_args()
    asyncio.run(session(args.target, args.key, args.skill))


if __name__ == "__main__":
    main()

"""`python -m node mcp`: the node's skills as MCP tools over stdio, for an MCP client that starts it.

The same skills, agents and checkpoints as `serve` (one `--cache-dir`: a conversation started over
stdio continues over HTTP and back), without the HTTP server. stdout carries the protocol only:
progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable

from node.cli.flags import add_setting_flags
from node.config import NodeConfig

# What the skills and their agents need: the same settings as `serve`, without the HTTP server's.
SETTINGS_USED = (
    *("skills", "model", "cache_dir", "max_tokens", "max_agents", "threads"),
    *("memory_budget_bytes", "disk_budget_bytes", "kv_storage", "block_store", "mcp_servers"),
)


def add_parser(commands) -> None:
    p = commands.add_parser("mcp", help="serve the skills as MCP tools over stdio")
    add_setting_flags(p, SETTINGS_USED)


def run(args: argparse.Namespace, config: NodeConfig, progress: Callable[[str], None]) -> int:
    return asyncio.run(serve_stdio(config, progress))


async def serve_stdio(config: NodeConfig, progress: Callable[[str], None]) -> int:
    from node.a2a.executor import SkillRuntime
    from node.mcp.server import build_mcp_server
    from node.mcp.tools import skill_tools
    from node.server.app import start_manager, warm_up
    from skills import SKILLS

    runtime = SkillRuntime(config, await start_manager(config, progress))
    try:
        executors = {skill_id: SKILLS[skill_id](runtime) for skill_id in config.skills}
        async with skill_tools(runtime, config.mcp_servers):
            await warm_up(runtime, executors.values())
            progress(f"serving {', '.join(config.skills)} as MCP tools over stdio (cache {config.cache_dir})")
            await build_mcp_server(runtime, executors).run_stdio_async()
        return 0
    finally:
        runtime.stop_all()
        await runtime.manager.close()

"""What each CLI command does, kept apart from argument parsing.

Nothing here imports MLX at module level: the CLI binds the fast BLAS first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from pathlib import Path

from node.config import default_cache_dir

Progress = Callable[[str], None]


def _sampling(args: argparse.Namespace):
    from node.runtime.generation import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)


def _cache_dir(args: argparse.Namespace) -> Path:
    return Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()


def _print_result(args: argparse.Namespace, completion) -> None:
    if args.json:
        result = {
            "text": completion.text,
            "finish_reason": completion.finish_reason,
            "usage": completion.usage.as_dict(),
        }
        if args.agent:
            result["agent"] = args.agent
        print(json.dumps(result))
    else:
        print()


def run_generate(args: argparse.Namespace, progress: Progress) -> int:
    from node.model.engine import Engine
    from node.runtime.generation import CachedContext, generate

    engine = Engine.load(args.model, progress)
    if args.agent:
        return asyncio.run(_generate_as_agent(engine, args))
    stream = None if args.json else (lambda text: print(text, end="", flush=True))
    if args.chat:
        prompt = engine.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt = engine.encode(args.prompt)
    completion = generate(
        engine, CachedContext(engine.make_caches()), prompt, _sampling(args), on_text=stream
    )
    _print_result(args, completion)
    return 0


async def _generate_as_agent(engine, args: argparse.Namespace) -> int:
    """Append the prompt to the agent's context (a chat turn with --chat), then checkpoint it."""
    from node.memory.agents import AgentManager

    manager = await AgentManager.start(engine, _cache_dir(args))
    try:
        metadata = await manager.metadata(args.agent) or {}
        if args.chat:
            messages = metadata.get("messages", []) + [{"role": "user", "content": args.prompt}]
            prompt = engine.encode_chat(messages)
            metadata = lambda done: {"messages": messages + [{"role": "assistant", "content": done.text}]}
        else:
            # The last sampled token is not fed to the model yet, so the cache lacks it.
            history = await manager.tokens(args.agent) + metadata.get("unfed_tokens", [])
            prompt = history + engine.encode(args.prompt, add_bos=not history)
            metadata = lambda done: {"unfed_tokens": list(done.token_ids[-1:])}
        completion = None
        async for item in manager.stream(args.agent, prompt, _sampling(args), metadata=metadata):
            if isinstance(item, str) and not args.json:
                print(item, end="", flush=True)
            completion = item
        _print_result(args, completion)
    finally:
        await manager.close()
    return 0


def run_serve(args: argparse.Namespace, progress: Progress) -> int:
    from node.server.serve import run_serve as serve

    return serve(args, progress)


def dispatch(args: argparse.Namespace, progress: Progress) -> int:
    from node import bench
    from node.cli import cache_commands

    handlers = {
        "generate": run_generate,
        "cache": cache_commands.run_cache,
        "serve": lambda args, p: run_serve(args, p),
        "bench": bench.run,
    }
    return handlers[args.command](args, progress)


def run_demo(args: argparse.Namespace) -> int:
    from node.demo.run import run

    return run(args.demo_cache_dir)

"""What each CLI command does, kept apart from argument parsing.

Nothing here imports MLX at module level: `python -m node --help` and `serve`'s argument errors
answer without loading it (node.model binds the fast BLAS when a command first needs it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from pathlib import Path

from node.config import NodeConfig

Progress = Callable[[str], None]


def _sampling(args: argparse.Namespace):
    from node.runtime.generation import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)


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


def run_generate(args: argparse.Namespace, config: NodeConfig, progress: Progress) -> int:
    from node.model.blas import set_blas_threads
    from node.model.engine import Engine
    from node.runtime.generation import CachedContext, generate

    set_blas_threads(config.threads)
    engine = Engine.load(config.model, progress)
    if args.agent:
        return asyncio.run(_generate_as_agent(engine, args, config))
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


async def _generate_as_agent(engine, args: argparse.Namespace, config: NodeConfig) -> int:
    """Append the prompt to the agent's context (a chat turn with --chat), then checkpoint it."""
    from node.memory.agents import AgentManager
    from node.runtime.events import Completion, TextDelta

    manager = await AgentManager.start(engine, config.cache_dir, kv_storage=config.kv_storage)
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
            match item:
                case TextDelta(text=text) if not args.json:
                    print(text, end="", flush=True)
                case Completion():
                    completion = item
        _print_result(args, completion)
    finally:
        await manager.close()
    return 0


def run_serve(args: argparse.Namespace, config: NodeConfig, progress: Progress) -> int:
    from node.server.serve import serve

    return asyncio.run(serve(config, progress))


def run_eval(args: argparse.Namespace, config: NodeConfig, progress: Progress) -> int:
    from node.eval.run import run_eval as evaluate

    skills = tuple(s.strip() for s in args.skills.split(",") if s.strip())
    json_path = Path(args.json) if args.json else None
    document = evaluate(config.model, skills, args.per_skill, args.max_tokens, json_path, print, args.url)
    print(
        f"passed: {document['passed_share']:.0%} of {document['questions']} answers {document['by_skill']}; "
        f"non-empty {document['non_empty_share']:.0%}, no echo {document['no_echo_share']:.0%}, "
        f"passed naming a domain term (not only the subject) {document['passed_on_terms_share']:.0%}"
    )
    if json_path is not None:
        print(f"results: {json_path}")
    return 0


def dispatch(args: argparse.Namespace, config: NodeConfig, progress: Progress) -> int:
    from node import bench
    from node.bench import load
    from node.cli import cache_commands, mcp_command

    handlers = {
        "generate": run_generate,
        "cache": cache_commands.run_cache,
        "serve": run_serve,
        "mcp": mcp_command.run,
        "bench": bench.run,
        "load": load.run,
        "eval": run_eval,
    }
    return handlers[args.command](args, config, progress)


def run_demo(args: argparse.Namespace) -> int:
    from node.demo.run import run

    return run(args.demo_dir)

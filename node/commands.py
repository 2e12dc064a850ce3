"""What each CLI command does, kept apart from argument parsing."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


Progress = Callable[[str], None]


def _sampling(args: argparse.Namespace):
    from node.generation import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)


def _prompt_tokens(engine, args: argparse.Namespace) -> list[int]:
    if args.chat:
        return engine.encode_chat([{"role": "user", "content": args.prompt}])
    return engine.encode(args.prompt)


def run_generate(args: argparse.Namespace, progress: Progress) -> int:
    import json

    from node.engine import Engine
    from node.generation import CachedContext, generate

    engine = Engine.load(args.model, progress)
    stream = None if args.json else (lambda text: print(text, end="", flush=True))
    context = CachedContext(engine.make_caches())
    completion = generate(engine, context, _prompt_tokens(engine, args), _sampling(args), on_text=stream)
    if args.json:
        print(json.dumps({"text": completion.text, "finish_reason": completion.finish_reason, "usage": completion.usage.as_dict()}))
    else:
        print()
    return 0


def run_serve(args: argparse.Namespace, progress: Progress) -> int:
    from node.serve import run_serve as serve

    return serve(args, progress)


def dispatch(args: argparse.Namespace, progress: Progress) -> int:
    handlers = {"generate": run_generate, "serve": lambda args, p: run_serve(args, p)}
    return handlers[args.command](args, progress)


def run_demo(args: argparse.Namespace) -> int:
    print("demo not built yet", file=sys.stderr)
    return 1

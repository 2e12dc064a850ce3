"""Subprocess side of the bench: measurements that must happen in a fresh process.

    python -m node.bench.worker load --model SPEC
    python -m node.bench.worker restore --model SPEC --cache-dir DIR --agents a,b --decode N
    python -m node.bench.worker greedy --model SPEC --prompt-tokens P --decode N

Each prints one JSON object on its last stdout line. `restore` loads the model first (not timed),
then for each agent times only `CheckpointStore.restore` (which evaluates the restored arrays),
then feeds the agent's one unfed token and decodes N tokens on the restored cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _progress(message: str) -> None:
    print(f"[worker] {message}", file=sys.stderr, flush=True)


def load(args: argparse.Namespace) -> dict:
    from node.model.engine import Engine

    started = time.perf_counter()
    engine = Engine.load(args.model, _progress)
    return {
        "load_s": round(engine.info.load_s, 3),
        "wall_s": round(time.perf_counter() - started, 3),
        "info": engine.describe(),
    }


def restore_one(engine, store, agent_id: str, decode: int) -> dict:
    from node.runtime.generation import CachedContext, SamplingParams, generate

    started = time.perf_counter()
    restored = store.restore(agent_id, engine.make_caches)  # mx.eval's the restored arrays
    restore_s = time.perf_counter() - started
    prompt = restored.tokens + list(restored.metadata.get("unfed_tokens", []))
    context = CachedContext(restored.caches, list(restored.tokens))
    completion = generate(engine, context, prompt, SamplingParams(max_tokens=decode))
    usage = completion.usage
    steps = max(usage.generated_tokens - 1, 0)
    return {
        "agent_id": agent_id,
        "tokens": len(restored.tokens),
        "restore_s": round(restore_s, 5),
        "cached_tokens": usage.cached_tokens,
        "first_token_s": usage.prefill_s,
        "generated_tokens": usage.generated_tokens,
        "decode_tok_s": round(steps / usage.generate_s, 3) if steps and usage.generate_s else None,
        "text": completion.text,
    }


def restore(args: argparse.Namespace) -> dict:
    from node.memory.checkpoint import CheckpointStore
    from node.model.engine import Engine

    engine = Engine.load(args.model, _progress)
    store = CheckpointStore(args.cache_dir, engine.info.fingerprint)
    agents = [restore_one(engine, store, agent_id, args.decode) for agent_id in args.agents.split(",")]
    return {"load_s": round(engine.info.load_s, 3), "agents": agents}


def greedy(args: argparse.Namespace) -> dict:
    """Prefill a P-token corpus prompt, then decode N tokens greedily (the weights the env selects)."""
    from node.bench import corpus
    from node.model.engine import Engine
    from node.runtime.generation import CachedContext, SamplingParams, generate

    engine = Engine.load(args.model, _progress)
    prompt = corpus.tokens(engine, args.prompt_tokens)
    generate(
        engine, CachedContext(engine.make_caches()), prompt[:32], SamplingParams(max_tokens=4)
    )  # warm-up
    completion = generate(
        engine, CachedContext(engine.make_caches()), prompt, SamplingParams(max_tokens=args.decode)
    )
    usage = completion.usage
    steps = max(usage.generated_tokens - 1, 0)
    return {
        "load_s": round(engine.info.load_s, 3),
        "kernels": engine.info.kernels,
        "prefill_s": round(usage.prefill_s, 3),
        "decode_tok_s": round(steps / usage.generate_s, 3) if steps and usage.generate_s else None,
        "token_ids": list(completion.token_ids),
    }


COMMANDS = {"load": load, "restore": restore, "greedy": greedy}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.bench.worker")
    sub = parser.add_subparsers(dest="command", required=True)
    load_parser = sub.add_parser("load")
    restore_parser = sub.add_parser("restore")
    restore_parser.add_argument("--cache-dir", required=True)
    restore_parser.add_argument("--agents", required=True)
    restore_parser.add_argument("--decode", type=int, default=16)
    greedy_parser = sub.add_parser("greedy")
    greedy_parser.add_argument("--prompt-tokens", type=int, default=512)
    greedy_parser.add_argument("--decode", type=int, default=200)
    for p in (load_parser, restore_parser, greedy_parser):
        p.add_argument("--model", default="default")
    args = parser.parse_args(argv)
    result = COMMANDS[args.command](args)
    print(json.dumps(result), flush=True)
    from node.cli.main import exit_without_mlx_teardown

    exit_without_mlx_teardown(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

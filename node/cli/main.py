"""Command line: `python -m node {generate,serve,cache,bench}` and `python -m node --demo`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from node import bench
from node.cli import cache_commands
from node.errors import NodeError

logger = logging.getLogger("node")


def _progress(message: str) -> None:
    print(f"[node] {message}", file=sys.stderr, flush=True)


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="'default', an mlx-lm folder or a .gguf file")


def _add_cache_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir", default=None, help="agent checkpoints (default ~/.agent_caches or $NODE_CACHE_DIR)"
    )


def _generate_parser(commands) -> None:
    p = commands.add_parser("generate", help="complete a prompt (optionally as a persistent agent)")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--agent", default=None, help="use and checkpoint this persistent agent's cache")
    p.add_argument("--json", action="store_true", help="print one JSON object with text and usage")
    _add_model(p)
    _add_cache_dir(p)


def _serve_parser(commands) -> None:
    from node.config import ALL_SKILLS, NodeConfig

    defaults = NodeConfig()
    p = commands.add_parser("serve", help="serve the skills as A2A agents (JSON-RPC, HTTP+JSON, SSE)")
    p.add_argument("--host", default=defaults.host)
    p.add_argument("--port", type=int, default=defaults.port)
    p.add_argument("--skills", default=",".join(ALL_SKILLS), help="comma-separated skill ids to host")
    _add_model(p)
    _add_cache_dir(p)
    p.add_argument(
        "--api-key", default=None, help="require this key (Bearer or X-API-Key) on every call but the cards"
    )
    p.add_argument(
        "--max-message-bytes", type=int, default=defaults.max_message_bytes, help="largest request body"
    )
    p.add_argument(
        "--max-tokens", type=int, default=defaults.max_tokens, help="most tokens generated per task"
    )
    _network_flags(p, defaults)


def _network_flags(p: argparse.ArgumentParser, defaults) -> None:
    p.add_argument(
        "--peer", action="append", default=[], metavar="URL", help="a peer node's URL (repeatable)"
    )
    p.add_argument("--join", default=None, metavar="URL", help="register with the registry at this node URL")
    p.add_argument(
        "--registry", action="store_true", help="act as the network's registry (members in SQLite)"
    )
    p.add_argument(
        "--database-url",
        default=None,
        help="postgresql+asyncpg://... : registry and A2A task store in PostgreSQL, shared by the nodes",
    )
    p.add_argument(
        "--peer-timeout", type=float, default=defaults.peer_timeout_s, help="seconds per delegated sub-task"
    )
    p.add_argument(
        "--heartbeat", type=float, default=defaults.heartbeat_s, help="seconds between registry heartbeats"
    )
    p.add_argument(
        "--public-url", default=None, help="the URL others reach this node at (default: host and port)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m node", description=__doc__)
    parser.add_argument("--demo", action="store_true", help="run the multi-node demo on the default model")
    parser.add_argument(
        "--cache-dir",
        dest="demo_cache_dir",
        default=None,
        help="with --demo: keep the nodes' caches in this folder (default: a new temporary folder)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command")
    _generate_parser(commands)
    cache_commands.add_parser(commands, _add_model, _add_cache_dir)
    _serve_parser(commands)
    bench.add_parser(commands, _add_model, _add_cache_dir)
    return parser


def exit_without_mlx_teardown(code: int) -> None:
    """Leave the process without running MLX's C++ static destructors.

    MLX used from a non-main thread (our model worker) can abort in its destructors at exit with
    "terminate called without an active exception" (ml-explore/mlx issue 3126). Everything that
    matters is already flushed and fsynced when this runs.
    """
    if "mlx.core" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)


def main(argv: list[str] | None = None) -> int:
    code = _run(argv)
    exit_without_mlx_teardown(code)
    return code


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    from node.cli import commands

    try:
        if args.demo:
            return commands.run_demo(args)
        if args.command is None:
            build_parser().print_help()
            return 0
        return commands.dispatch(args, _progress)
    except NodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def print_json(obj: dict) -> None:
    print(json.dumps(obj, indent=None))

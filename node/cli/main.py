"""Command line: `python -m node {generate,serve,mcp,cache,bench}` and `python -m node --demo`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from node import bench
from node.bench import load
from node.cli import cache_commands, mcp_command
from node.cli.flags import add_model_flags, add_setting_flags, config_from_args
from node.config import ALL_SKILLS
from node.errors import NodeError


def _progress(message: str) -> None:
    print(f"[node] {message}", file=sys.stderr, flush=True)


def _generate_parser(commands) -> None:
    p = commands.add_parser("generate", help="complete a prompt (optionally as a persistent agent)")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--agent", default=None, help="use and checkpoint this persistent agent's cache")
    p.add_argument("--json", action="store_true", help="print one JSON object with text and usage")
    add_model_flags(p)


def _eval_parser(commands) -> None:
    p = commands.add_parser("eval", help="ask each skill its question set over A2A and score the answers")
    p.add_argument("--skills", default=",".join(ALL_SKILLS), help="comma-separated skill ids")
    p.add_argument("--per-skill", type=int, default=None, help="first N questions per skill (default: all)")
    p.add_argument("--max-tokens", type=int, default=80)
    p.add_argument("--json", default="eval_results/eval.json", metavar="PATH", help="results file")
    p.add_argument(
        "--url", default=None, help="evaluate the node already serving at URL (default: start one)"
    )
    add_setting_flags(p, ("model",))


def _serve_parser(commands) -> None:
    p = commands.add_parser("serve", help="serve the skills as A2A agents (JSON-RPC, HTTP+JSON, SSE)")
    add_setting_flags(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m node", description=__doc__)
    parser.add_argument("--demo", action="store_true", help="run the multi-node demo on the default model")
    parser.add_argument(
        "--demo-dir",
        dest="demo_dir",
        default=None,
        help="with --demo: keep the nodes' caches and logs in this folder (default: a new temporary folder)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command")
    _generate_parser(commands)
    cache_commands.add_parser(commands, add_model_flags)
    _serve_parser(commands)
    _eval_parser(commands)
    mcp_command.add_parser(commands)
    load.add_parser(commands)
    bench.add_parser(commands, add_model_flags)
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
        return commands.dispatch(args, config_from_args(args), _progress)
    except NodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

"""`python -m node bench`: the measurements this project's claims rest on, side by side in one run.

Each scenario is a module registered in `node.bench.registry.SCENARIOS`; the runner loads the model
once, runs the selected scenarios in order, prints a table per scenario, and writes one JSON
document (`node.bench.results`) and a plot (`node.bench.plot`). Subprocess measurements (a restore in
a fresh process, cold model conversion, the llama.cpp peer) go through `node.bench.worker` and
`node.bench.llama_worker`. Nothing here imports MLX at import time: the CLI binds the fast BLAS first.
"""

from __future__ import annotations

import argparse

DEFAULT_JSON = "bench_results/bench.json"
DEFAULT_PLOT = "bench_results/context_scaling.png"


def add_parser(commands, add_model_flags) -> None:
    """The `bench` sub-parser. The bench never touches the user's checkpoints: it writes its own
    into a throwaway --work-dir (its --cache-dir is not used)."""
    p = commands.add_parser(
        "bench", help="benchmark load, prefill, decode, restore vs re-prefill, and a llama.cpp peer"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smaller contexts, no cold conversion, no 20k context (~5-10 min)",
    )
    p.add_argument(
        "--json", default=DEFAULT_JSON, metavar="PATH", help=f"results file (default {DEFAULT_JSON})"
    )
    p.add_argument(
        "--plot", default=DEFAULT_PLOT, metavar="PATH", help=f"context-scaling plot (default {DEFAULT_PLOT})"
    )
    p.add_argument(
        "--scenarios", default=None, help="comma-separated names or numbers (default: all); see --list"
    )
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument(
        "--synthetic",
        default=None,
        metavar="SHAPE",
        help="instead: restore vs recompute on a random-weight model of this shape, built on the "
        "machine (gemma3-12b; tiny for a dry run): node.bench.gpu_restore, for GPUs",
    )
    p.add_argument(
        "--work-dir",
        default=None,
        help="where checkpoints are written (default: a temporary folder, removed)",
    )
    add_model_flags(p)


def run(args: argparse.Namespace, config, progress) -> int:
    if args.synthetic:
        from node.bench import gpu_restore

        json_path = "bench_results/gpu_restore.json" if args.json == DEFAULT_JSON else args.json
        extra = ["--work-dir", args.work_dir] if args.work_dir else []
        return gpu_restore.main(["--synthetic", args.synthetic, "--json", json_path, *extra])
    from node.bench.runner import run_from_args

    return run_from_args(args, config, progress)

"""Run the selected scenarios on one loaded model and write the JSON document and the plot."""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import tempfile
import time
import traceback
from pathlib import Path

from node.bench import results as res
from node.bench.profile import FULL, QUICK, BenchOptions
from node.bench.workbench import Bench
from node.config import NodeConfig

logger = logging.getLogger(__name__)


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def options_from_args(args: argparse.Namespace, config: NodeConfig) -> BenchOptions:
    scenarios = tuple(s for s in (args.scenarios or "").split(",") if s.strip())
    return BenchOptions(
        profile=QUICK if args.quick else FULL,
        model=config.model,
        scenarios=scenarios,
        json_path=Path(args.json) if args.json else None,
        plot_path=Path(args.plot) if args.plot else None,
        work_dir=Path(args.work_dir) if args.work_dir else None,
    )


def run_from_args(args: argparse.Namespace, config: NodeConfig, progress) -> int:
    from node.bench.registry import SCENARIOS

    if args.list:
        for s in SCENARIOS:
            print(f"{s.number}  {s.name:12} {s.title}")
        return 0
    document = run_bench(options_from_args(args, config))
    return 0 if all(r["status"] != "failed" for r in document["scenarios"]) else 1


def run_bench(options: BenchOptions) -> dict:
    """Run the bench and return its JSON document (also written to options.json_path)."""
    from node.bench.registry import select

    selected = select(options.scenarios)  # fails fast on an unknown name, before loading the model
    work_dir = Path(options.work_dir or tempfile.mkdtemp(prefix="node-bench-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        return asyncio.run(_run(options, selected, work_dir))
    finally:
        if options.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)


async def _run(options: BenchOptions, selected, work_dir: Path) -> dict:
    from node.model.engine import Engine

    say(
        f"profile {options.profile.name}; scenarios: {', '.join(s.name for s in selected)}; work dir {work_dir}"
    )
    engine = Engine.load(options.model, say, cache_root=options.model_cache)
    say(
        f"model {engine.info.name}: {engine.info.backend} {engine.info.dtype}, loaded in {engine.info.load_s:.2f} s"
    )
    env = {"machine": res.machine_info(), "model": engine.describe(), "versions": res.versions()}
    header = {"profile": options.profile.name, "started": res.timestamp(), **env}
    bench = Bench(engine, options, work_dir, say)
    records = []
    try:
        for scenario in selected:
            records.append(await _run_one(bench, scenario, env))
    finally:
        await bench.close()
    return _finish(options, header, records)


async def _run_one(bench: Bench, scenario, env: dict) -> dict:
    say(f"== {scenario.number}. {scenario.title}")
    started = time.perf_counter()
    try:
        outcome = await scenario.run(bench)
    except Exception as e:
        logger.debug("scenario %s failed", scenario.name, exc_info=True)
        outcome = res.Outcome(
            {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]},
            notes=[f"FAILED: {type(e).__name__}: {e}"],
            status="failed",
        )
    seconds = time.perf_counter() - started
    record = res.scenario_record(scenario.number, scenario.name, scenario.title, outcome, env, seconds)
    if outcome.table is not None:
        print(outcome.table.render())
    for note in outcome.notes:
        print(f"  * {note}")
    say(f"{scenario.name}: {outcome.status} in {seconds:.1f} s")
    return record


def _finish(options: BenchOptions, header: dict, records: list[dict]) -> dict:
    from node.bench.plot import plot_context_scaling

    document = {"schema": res.SCHEMA, **header, "scenarios": records}
    if options.json_path is not None:
        document = {**document, "finished": res.timestamp()}
        say(f"results: {res.write_document(options.json_path, header, records)}")
    if options.plot_path is not None:
        machine = header["machine"]
        title = (
            f"Restore vs re-prefill: {header['model']['name']}\n{machine['cores']} cores, {machine['cpu']}"
        )
        written = plot_context_scaling(records, options.plot_path, title)
        say(
            f"plot: {written}"
            if written
            else "plot skipped (no context figures, or matplotlib missing: pip install matplotlib)"
        )
    return document

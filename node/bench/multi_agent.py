"""Scenario 4: technical, business and coordinator agents with isolated caches.

Creation prefills and checkpoints each agent's system prompt; the technical and business agents
then answer the same brief concurrently, and the coordinator reads both answers.
"""

from __future__ import annotations

import time
from pathlib import Path

from node.bench import corpus
from node.bench.results import Outcome, Table
from node.bench.workbench import Bench

BRIEF = " Task: read this week's report and give your assessment."


def model_bytes(engine) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(engine.model.parameters()))


def rss_bytes() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


async def _create(bench: Bench, manager, systems: dict[str, list[int]]) -> dict[str, float]:
    seconds = {}
    for role, system in systems.items():
        started = time.perf_counter()
        await manager.ensure_prefix(role, system)
        seconds[role] = round(time.perf_counter() - started, 4)
    return seconds


async def _workflow(bench: Bench, manager, systems: dict[str, list[int]]) -> tuple[dict, dict]:
    from node.memory.agents import AgentRequest
    from node.runtime.generation import SamplingParams

    engine, params = bench.engine, SamplingParams(max_tokens=bench.profile.task_tokens)
    brief = engine.encode(corpus.document(3, offset=3000) + BRIEF, add_bos=False)
    started = time.perf_counter()
    analysts = await manager.generate_concurrent(
        [AgentRequest(role, systems[role] + brief, params) for role in ("technical", "business")]
    )
    analysts_s = time.perf_counter() - started
    notes = f" Technical notes: {analysts[0].text.strip()} Business notes: {analysts[1].text.strip()} Plan:"
    started = time.perf_counter()
    plan = await manager.generate(
        "coordinator", systems["coordinator"] + engine.encode(notes, add_bos=False), params
    )
    seconds = {
        "technical+business_s": round(analysts_s, 4),
        "coordinator_s": round(time.perf_counter() - started, 4),
    }
    completions = {"technical": analysts[0], "business": analysts[1], "coordinator": plan}
    return seconds, completions


async def run(bench: Bench) -> Outcome:
    manager = await bench.new_manager("multi_agent")
    systems = {
        role: corpus.role_prompt(bench.engine, role, bench.profile.system_tokens) for role in corpus.ROLES
    }
    try:
        bench.say(f"creating {len(systems)} agents ({bench.profile.system_tokens}-token system prompts) ...")
        started = time.perf_counter()
        creation = await _create(bench, manager, systems)
        bench.say("technical + business concurrently, then the coordinator ...")
        generation, completions = await _workflow(bench, manager, systems)
        total_s = time.perf_counter() - started
        held = {role: await manager.tokens(role) for role in systems}
        stats = manager.stats()
    finally:
        await manager.close()
    isolated = all(held[role][: len(system)] == system for role, system in systems.items())
    agents = {
        role: {
            "create_s": creation[role],
            "tokens": len(held[role]),
            "generated_tokens": completions[role].usage.generated_tokens,
            "cached_tokens": completions[role].usage.cached_tokens,
            "bytes_in_memory": stats["agents"].get(role, {}).get("bytes_in_memory"),
        }
        for role in systems
    }
    weights = model_bytes(bench.engine)
    results = {
        "agents": agents,
        "creation_s": round(sum(creation.values()), 4),
        "generation_s": round(sum(generation.values()), 4),
        **generation,
        "total_s": round(total_s, 4),
        "model_bytes": weights,
        "cache_bytes_in_memory": stats["bytes_in_memory"],
        "memory_bytes": weights + stats["bytes_in_memory"],
        "process_rss_bytes": rss_bytes(),
        "disk_bytes": stats["on_disk"]["bytes"],
        "isolated": isolated,
    }
    table = Table(["agent", "create s", "tokens", "cached at task", "generated", "MB in memory"])
    for role, a in agents.items():
        table.add(
            role,
            a["create_s"],
            a["tokens"],
            a["cached_tokens"],
            a["generated_tokens"],
            round((a["bytes_in_memory"] or 0) / 1e6, 2),
        )
    notes = [
        f"creation {results['creation_s']:.2f} s, generation {results['generation_s']:.2f} s, total {results['total_s']:.2f} s",
        (
            f"memory: model {weights / 1e6:.0f} MB + caches {stats['bytes_in_memory'] / 1e6:.1f} MB; "
            f"disk {results['disk_bytes'] / 1e6:.1f} MB; caches isolated: {isolated}"
        ),
    ]
    return Outcome(results, table, notes)

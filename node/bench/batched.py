"""Scenario 6: batched decode across concurrent agents vs one agent after another.

For 1, 3 and 8 agents (each with its own short context and cache), the same requests run twice
through the real `AgentManager`: with the worker's batched decode, and with batching switched off
(each agent stepped on its own). Aggregate decode tokens/s and wall time, side by side.
"""

from __future__ import annotations

import time

from node.bench.results import Outcome, Table
from node.bench.workbench import Bench

AGENT_COUNTS = (1, 3, 8)


def _requests(bench: Bench, count: int, tokens: int):
    from node.memory.agents import AgentRequest
    from node.runtime.generation import SamplingParams

    return [
        AgentRequest(
            f"batch-{i}",
            bench.engine.encode(f"Report {i}: the quarterly numbers for region {i} show that"),
            SamplingParams(max_tokens=tokens),
        )
        for i in range(count)
    ]


async def _measure(bench: Bench, count: int, batched: bool, tokens: int) -> dict:
    from node.memory.agents import AgentRequest
    from node.runtime.generation import SamplingParams

    manager = await bench.new_manager(f"batched-{count}-{'on' if batched else 'off'}")
    manager.worker.batched = batched
    try:
        requests = _requests(bench, count, tokens)
        # Prefill every agent first, so the timed run measures decode only.
        warm = [AgentRequest(r.agent_id, r.prompt, SamplingParams(max_tokens=1)) for r in requests]
        await manager.generate_concurrent(warm)
        started = time.perf_counter()
        completions = await manager.generate_concurrent(requests)
        wall_s = time.perf_counter() - started
        largest = manager.stats()["batching"]["largest_batch"]
    finally:
        await manager.close()
    generated = sum(c.usage.generated_tokens for c in completions)
    return {
        "agents": count,
        "batched": batched,
        "generated_tokens": generated,
        "wall_s": round(wall_s, 3),
        "aggregate_tok_s": round(generated / wall_s, 2),
        "largest_batch": largest,
    }


async def run(bench: Bench) -> Outcome:
    tokens = bench.profile.batched_tokens
    table = Table(
        ["agents", "batched tok/s", "sequential tok/s", "speedup", "batched wall s", "sequential wall s"]
    )
    rows = []
    for count in AGENT_COUNTS:
        bench.say(f"{count} concurrent agent(s), {tokens} tokens each: batched, then one after another ...")
        on = await _measure(bench, count, True, tokens)
        off = await _measure(bench, count, False, tokens)
        speedup = round(on["aggregate_tok_s"] / off["aggregate_tok_s"], 2)
        rows.append({"agents": count, "batched": on, "sequential": off, "speedup": speedup})
        table.add(count, on["aggregate_tok_s"], off["aggregate_tok_s"], speedup, on["wall_s"], off["wall_s"])
    single = rows[0]["batched"]["aggregate_tok_s"]
    three = next(r for r in rows if r["agents"] == 3)["batched"]["aggregate_tok_s"]
    results = {
        "tokens_per_agent": tokens,
        "rows": rows,
        "three_agents_vs_one": round(three / single, 2),
        "target_three_agents_vs_one": 2.5,
    }
    notes = [
        f"3 concurrent agents reach {results['three_agents_vs_one']}x the decode throughput of one (target 2.5x)"
    ]
    return Outcome(results=results, table=table, notes=notes)

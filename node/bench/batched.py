"""Scenario 6: batched decode across concurrent agents vs one agent after another.

For 1, 3 and 8 agents (each with its own short context and cache), the same requests run twice
through the real `AgentManager`: with the worker's batched decode, and with batching switched off
(each agent stepped on its own). Aggregate tokens/s over the requests' wall time (which also holds
each task's start and its checkpoint commit at the end) and over the worker's decode steps alone,
side by side: medians of `batched_rounds` rounds (every round in the JSON). Each round runs every
agent count batched, back to back, then every count one by one: the host's memory bandwidth drifts
between two states within seconds (one agent's step 7.3 or 10 ms), so 3 agents vs 1 is also given
as the median of each round's own ratio, whose two runs lie ~1 s apart (`..._paired`).
"""

from __future__ import annotations

import time

from node.bench.results import Outcome, Table, median
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


async def _measure(bench: Bench, count: int, batched: bool, tokens: int, round_: int) -> dict:
    from node.memory.agents import AgentRequest
    from node.runtime.generation import SamplingParams

    manager = await bench.new_manager(f"batched-{count}-{'on' if batched else 'off'}-{round_}")
    manager.worker.batched = batched
    try:
        requests = _requests(bench, count, tokens)
        # Prefill every agent first, so the timed run measures decode only.
        warm = [AgentRequest(r.agent_id, r.prompt, SamplingParams(max_tokens=1)) for r in requests]
        await manager.generate_concurrent(warm)
        manager.worker.step_seconds.clear()
        started = time.perf_counter()
        completions = await manager.generate_concurrent(requests)
        wall_s = time.perf_counter() - started
        largest = manager.stats()["batching"]["largest_batch"]
        decode_s = sum(manager.worker.step_seconds)
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
        "decode_steps_s": round(decode_s, 3),
        "decode_steps": len(manager.worker.step_seconds),
        "decode_tok_s": round(generated / decode_s, 2),
    }


async def run(bench: Bench) -> Outcome:
    tokens, rounds = bench.profile.batched_tokens, bench.profile.batched_rounds
    table = Table(
        ["agents", "batched tok/s", "sequential tok/s", "speedup", "batched decode-step tok/s", "batched wall s",
         "sequential wall s"]
    )  # fmt: skip
    measured = {count: {"batched": [], "sequential": []} for count in AGENT_COUNTS}
    for round_ in range(1, rounds + 1):
        bench.say(
            f"round {round_}/{rounds}: {_listed(AGENT_COUNTS, '')} agents, {tokens} tokens each: batched, then one by one ..."
        )
        for batched in (True, False):
            for count in AGENT_COUNTS:
                measured[count]["batched" if batched else "sequential"].append(
                    await _measure(bench, count, batched, tokens, round_)
                )
    rows = []
    for count, runs in measured.items():
        on, off = runs["batched"], runs["sequential"]
        row = {
            "agents": count,
            "batched_tok_s": median([m["aggregate_tok_s"] for m in on], 3),
            "sequential_tok_s": median([m["aggregate_tok_s"] for m in off], 3),
            "batched_decode_tok_s": median([m["decode_tok_s"] for m in on], 3),
            "batched_wall_s": median([m["wall_s"] for m in on], 3),
            "sequential_wall_s": median([m["wall_s"] for m in off], 3),
            "rounds": runs,
        }
        row["speedup"] = round(row["batched_tok_s"] / row["sequential_tok_s"], 2)
        rows.append(row)
        table.add(
            count,
            row["batched_tok_s"],
            row["sequential_tok_s"],
            row["speedup"],
            row["batched_decode_tok_s"],
            row["batched_wall_s"],
            row["sequential_wall_s"],
        )
    three = next(r for r in rows if r["agents"] == 3)
    results = {
        "tokens_per_agent": tokens,
        "rounds": rounds,
        "rows": rows,
        "three_agents_vs_one": round(three["batched_tok_s"] / rows[0]["batched_tok_s"], 2),
        "three_agents_vs_one_per_round": _ratios(measured, "aggregate_tok_s"),
        "three_agents_vs_one_decode_steps": round(
            three["batched_decode_tok_s"] / rows[0]["batched_decode_tok_s"], 2
        ),
        "three_agents_vs_one_decode_steps_per_round": _ratios(measured, "decode_tok_s"),
        "target_three_agents_vs_one": 2.5,
    }
    results["three_agents_vs_one_paired"] = median(results["three_agents_vs_one_per_round"], 2)
    results["three_agents_vs_one_decode_steps_paired"] = median(
        results["three_agents_vs_one_decode_steps_per_round"], 2
    )
    wall, steps = (
        results["three_agents_vs_one_per_round"],
        results["three_agents_vs_one_decode_steps_per_round"],
    )
    notes = [
        f"3 concurrent agents reach {results['three_agents_vs_one']}x the throughput of one over the requests'"
        + f" wall time and {results['three_agents_vs_one_decode_steps']}x over the decode steps alone (medians"
        + f" of {rounds} rounds); paired, the median of each round's ratio: {results['three_agents_vs_one_paired']}x"
        + f" (rounds {_listed(wall)}) and {results['three_agents_vs_one_decode_steps_paired']}x"
        + f" (rounds {_listed(steps)}); target 2.5x"
    ]
    return Outcome(results=results, table=table, notes=notes)


def _ratios(measured: dict, field: str) -> list[float]:
    """Per round, 3 batched agents' `field` over one agent's."""
    pairs = zip(measured[1]["batched"], measured[3]["batched"], strict=True)
    return [round(three[field] / one[field], 2) for one, three in pairs]


def _listed(values, unit: str = "x") -> str:
    return ", ".join(f"{v}{unit}" for v in values)

"""The registered scenarios, in run order.

To add a scenario: write a module with
`async def run(bench: Bench) -> Outcome` and append one `Scenario(...)` line to `SCENARIOS`.
Later scenarios may read what earlier ones left in `bench.shared`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from node.bench import (
    batched,
    context,
    memory,
    multi_agent,
    peer,
    runtime,
    sampling,
    sessions,
    store,
    weights,
)
from node.bench.results import Outcome
from node.bench.workbench import Bench
from node.errors import BenchError


@dataclass(frozen=True)
class Scenario:
    number: int
    name: str
    title: str
    run: Callable[[Bench], Awaitable[Outcome]]


SCENARIOS: list[Scenario] = [
    Scenario(0, "runtime", "Model runtime: load, prefill and decode speed", runtime.run),
    Scenario(1, "single", "Single session: agent manager vs a cold engine", sessions.run_single),
    Scenario(2, "resume", "Five-session resume: restore from disk vs cold prefill", sessions.run_resume),
    Scenario(3, "context", "Context scaling: restore in a fresh process vs re-prefill", context.run),
    Scenario(4, "multi_agent", "Multi-agent workflow with isolated caches", multi_agent.run),
    Scenario(5, "peer", "llama.cpp on the same GGUF, with its own state save/restore", peer.run),
    Scenario(6, "batched", "Batched decode across concurrent agents vs sequential", batched.run),
    Scenario(
        7, "memory", "Memory engine: shared prefixes, bytes on disk, storage accuracy, decode p99", memory.run
    ),
    Scenario(8, "weights", "Decode weights: int8 vs fp32, greedy agreement and speed", weights.run),
    Scenario(9, "store", "Shared block store: resume from S3 vs local disk vs prefill", store.run),
    Scenario(10, "sampling", "Sampling a token: node's samplers vs mlx-lm's", sampling.run),
]


def select(names: tuple[str, ...] | list[str]) -> list[Scenario]:
    """Scenarios by name or number, in registered order; all of them for an empty selection."""
    if not names:
        return list(SCENARIOS)
    wanted = {n.strip() for n in names if n.strip()}
    known = {s.name for s in SCENARIOS} | {str(s.number) for s in SCENARIOS}
    unknown = sorted(wanted - known)
    if unknown:
        raise BenchError(f"unknown scenario(s) {', '.join(unknown)}; known: {describe()}")
    return [s for s in SCENARIOS if s.name in wanted or str(s.number) in wanted]


def describe() -> str:
    return ", ".join(f"{s.number}={s.name}" for s in SCENARIOS)

"""What one bench run measures: sizes and token counts per mode, and the run's options."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass(frozen=True)
class Profile:
    name: str
    context_sizes: tuple[int, ...]  # scenario 3 and the peer; the largest also gets the append test
    prefill_sizes: tuple[int, ...]  # scenario 0's prefill rates (reused from scenario 3's contexts)
    decode_tokens: int  # tokens decoded to measure decode speed
    restored_decode_tokens: int  # scenarios 3 and 5: tokens decoded after each restore, both sides
    peer_rounds: int  # scenario 5: rounds of restore + decode, ours then llama.cpp (medians reported)
    task_tokens: int  # tokens generated per task in scenarios 1, 2 and 4
    batched_tokens: int  # scenario 6: tokens each concurrent agent decodes
    batched_rounds: int  # scenario 6: rounds of 1, 3 and 8 agents (medians reported)
    append_tokens: int  # the task appended to the largest context (checkpoint cost)
    resume_context: int  # tokens of the document that scenario 2's agent starts from
    resume_sessions: int
    system_tokens: int  # each scenario-4 agent's system prompt
    cold_conversion: bool  # scenario 0: convert the model from scratch in a throwaway cache
    store_sizes: tuple[int, ...] = ()  # scenario 9: contexts resumed from the object store


QUICK = Profile(
    name="quick",
    context_sizes=(70, 2048, 8192),
    prefill_sizes=(512, 2048),
    decode_tokens=24,
    restored_decode_tokens=64,  # fewer swung the figures of both sides by 30% on a shared host
    peer_rounds=3,
    task_tokens=12,
    batched_tokens=64,  # with 12, each request's fixed costs weighed on the 1-agent row and runs swung
    batched_rounds=7,  # single rounds of 1 vs 3 agents gave 2.3-3.2x back to back on a shared host
    append_tokens=100,
    resume_context=1024,
    resume_sessions=5,
    system_tokens=256,
    cold_conversion=False,
    store_sizes=(2048, 8192),
)

FULL = replace(
    QUICK,
    name="full",
    context_sizes=(70, 2048, 8192, 20480),
    decode_tokens=48,
    task_tokens=24,
    resume_context=2048,
    system_tokens=512,
    cold_conversion=True,
    store_sizes=(2048, 8192, 32000),  # 32k: the model's context is 32,768 with the generated token
)


@dataclass(frozen=True)
class BenchOptions:
    profile: Profile = QUICK
    model: str = "default"
    scenarios: tuple[str, ...] = ()  # names; empty: all registered
    json_path: Path | None = Path("bench_results/bench.json")
    plot_path: Path | None = Path("bench_results/context_scaling.png")
    work_dir: Path | None = None  # None: a temporary folder, removed at the end
    model_cache: Path | None = (
        None  # converted-model cache (NODE_MODEL_CACHE) for this process and its children
    )
    extra_env: dict[str, str] = field(default_factory=dict)

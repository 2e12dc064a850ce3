"""Restore or recompute, decided by the node's own timings (`ObservedCosts`), on the GPU path."""

from __future__ import annotations

import copy
import dataclasses

import mlx.core as mx
import pytest

from node.memory import device_restore
from node.memory.agents import AgentManager
from node.memory.checkpoint import CheckpointStore
from node.memory.cost_model import ObservedCosts
from node.runtime.generation import SamplingParams

# A machine where prefill costs 10 us per token plus 1 ns per token per token of context, and a
# restore 20 ms plus 1 GB/s.
A, B, FIXED, RATE = 1e-5, 1e-9, 0.02, 1e9


def _prefill(start: int, end: int) -> float:
    return A * (end - start) + B * (end * end - start * start)


def _calibrated() -> ObservedCosts:
    costs = ObservedCosts()
    for start, end in [(0, 2048), (2048, 4096), (0, 8192), (1000, 20000)]:
        costs.observe_prefill(start, end, _prefill(start, end))
    for nbytes in (100_000_000, 800_000_000):
        costs.observe_restore(nbytes, FIXED + nbytes / RATE)
    return costs


def test_until_calibrated_the_node_restores():
    costs = ObservedCosts()
    costs.observe_prefill(0, 4096, 1.0)
    costs.observe_restore(1 << 20, 0.001)
    assert costs.model() is None and costs.choose(4096, 4000, 1 << 30).restore
    costs.observe_prefill(0, 50, 0.5)  # too short to measure the model: ignored
    assert costs.model() is None


def test_the_fit_recovers_the_machine_and_picks_the_faster_path():
    model = _calibrated().model()
    assert model.prefill_a_s == pytest.approx(A, rel=1e-6) and model.prefill_b_s == pytest.approx(B, rel=1e-6)
    assert model.warm_fixed_s == pytest.approx(FIXED) and model.warm_bytes_per_s == pytest.approx(RATE)
    costs = _calibrated()
    # 2k tokens: prefill 24.7 ms, reading 200 MB 220 ms -> recompute; 32k: 1.4 s vs 0.82 s -> restore
    assert not costs.choose(2048, 2048, 200_000_000).restore
    assert costs.choose(32768, 32768, 800_000_000).restore


def test_a_refused_plan_reads_nothing(tmp_path, tiny_engine):
    make = tiny_engine.make_caches
    store = CheckpointStore(tmp_path, "fp")
    caches = make()
    tokens = tiny_engine.encode("the cat sat on the mat " * 20)
    for start in range(0, len(tokens), 64):
        tiny_engine.model(mx.array(tokens[start : start + 64])[None], cache=caches)
    store.save("a", tokens, caches, 0, {})
    seen = []
    refused = device_restore.restore(
        store, "a", make, mx.float32, accept=lambda plan: seen.append(plan) and False
    )
    assert refused is None and seen[0].tokens == tokens and seen[0].nbytes > 0
    accepted = device_restore.restore(store, "a", make, mx.float32, accept=lambda plan: True)
    assert accepted.tokens == tokens


@pytest.fixture
def gpu_path_engine(tiny_engine):
    """The tiny engine, reporting a GPU backend: the manager takes its device-restore path."""
    engine = copy.copy(tiny_engine)
    engine.info = dataclasses.replace(tiny_engine.info, backend="gpu")
    return engine


@pytest.mark.parametrize("restore_is_slow", [False, True])
async def test_the_manager_recomputes_when_reading_is_predicted_slower(
    gpu_path_engine, tmp_path, restore_is_slow
):
    engine, params = gpu_path_engine, SamplingParams(max_tokens=4)
    first = engine.encode("the cat sat on the mat and the dog sat on the cat " * 12)
    manager = await AgentManager.start(engine, tmp_path)
    done = await manager.generate("a", first, params, metadata={"turn": 1})
    await manager.close()

    manager = await AgentManager.start(engine, tmp_path)  # a restart: the context is on disk only
    if restore_is_slow:
        for start, end in [(0, 256), (0, 1024)]:
            manager._costs.observe_prefill(start, end, 1e-6 * (end - start))
        for nbytes in (1000, 2000):
            manager._costs.observe_restore(nbytes, 10.0)
    follow = first + list(done.token_ids) + engine.encode(" and then")
    again = await manager.generate("a", follow, params)
    metadata = await manager.metadata("a")
    await manager.close()
    history = len(first) + len(done.token_ids)
    if restore_is_slow:
        assert again.usage.cached_tokens == 0 and again.usage.prefilled_tokens == len(follow)
    else:
        assert again.usage.cached_tokens >= history - 1
    assert metadata == {"turn": 1}  # kept either way

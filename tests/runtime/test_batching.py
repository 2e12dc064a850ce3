"""Concurrent agents decode in one batch; each agent's output equals its output alone."""

from __future__ import annotations

import asyncio

import pytest

from node.memory.agents import AgentManager, AgentRequest
from node.runtime.events import TextDelta
from node.runtime.generation import CachedContext, SamplingParams, generate

TEXTS = [
    "the cat sat on the mat and the dog sat " * 3,
    "a dog",
    "the mat is on the cat of the dog in a mat " * 2,
]


async def test_concurrent_requests_are_batched_and_match_solo_runs(tiny_engine, tmp_path):
    params = SamplingParams(max_tokens=16)
    prompts = [tiny_engine.encode(t) for t in TEXTS]
    alone = [generate(tiny_engine, CachedContext(tiny_engine.make_caches()), p, params) for p in prompts]
    manager = await AgentManager.start(tiny_engine, tmp_path)
    results = await manager.generate_concurrent(
        [AgentRequest(f"b{i}", p, params) for i, p in enumerate(prompts)]
    )
    stats = manager.stats()["batching"]
    await manager.close()
    assert [r.token_ids for r in results] == [a.token_ids for a in alone]
    assert stats["batched_steps"] > 0 and stats["largest_batch"] == 3


async def test_request_joins_a_running_batch_and_finished_ones_leave(tiny_engine, tmp_path):
    manager = await AgentManager.start(tiny_engine, tmp_path)
    decoding = asyncio.Event()

    async def long_request():
        result = None
        async for item in manager.stream("long", tiny_engine.encode(TEXTS[0]), SamplingParams(max_tokens=60)):
            if isinstance(item, TextDelta):
                decoding.set()  # the long sequence has a generated token: it is in the batch
            result = item
        return result

    long = asyncio.create_task(long_request())
    await asyncio.wait({long, asyncio.create_task(decoding.wait())}, return_when=asyncio.FIRST_COMPLETED)
    assert decoding.is_set() and not long.done()
    short = await manager.generate("short", tiny_engine.encode(TEXTS[1]), SamplingParams(max_tokens=4))
    assert not long.done()  # the short request finished while the long one kept going
    result = await long
    stats = manager.stats()["batching"]
    await manager.close()
    assert short.usage.generated_tokens == 4 and result.usage.generated_tokens == 60
    assert stats["batched_steps"] > 0 and stats["largest_batch"] == 2


async def test_cancel_during_prefill_stops_the_sequence(tiny_engine, tmp_path):
    import threading

    from node.runtime import generation

    manager = await AgentManager.start(tiny_engine, tmp_path)
    cancel = threading.Event()
    cancel.set()
    prompt = tiny_engine.encode("the cat " * 400)
    assert len(prompt) > generation.PREFILL_CHUNK
    result = await manager.generate("c", prompt, SamplingParams(max_tokens=5), cancel=cancel)
    await manager.close()
    assert result.finish_reason == "cancelled" and result.usage.generated_tokens == 0


@pytest.mark.slow
async def test_default_model_batched_greedy_equals_solo(engine, tmp_path):
    params = SamplingParams(max_tokens=12)
    prompts = [
        engine.encode("Q: What is the capital of France?\nA:"),
        engine.encode("Monday, Tuesday, Wednesday,"),
        engine.encode("The Eiffel Tower is located in the city of"),
    ]
    alone = [generate(engine, CachedContext(engine.make_caches()), p, params).text for p in prompts]
    manager = await AgentManager.start(engine, tmp_path)
    results = await manager.generate_concurrent(
        [AgentRequest(f"a{i}", p, params) for i, p in enumerate(prompts)]
    )
    stats = manager.stats()["batching"]
    await manager.close()
    assert [r.text for r in results] == alone
    assert stats["largest_batch"] == 3

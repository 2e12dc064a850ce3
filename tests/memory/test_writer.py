"""The checkpoint writer gives way to the model: idle scheduling, and rests between blocks while
sequences are decoding."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from node.memory import writer as writer_module
from node.memory.checkpoint import CheckpointStore
from node.memory.checkpoint_format import BLOCK_TOKENS
from node.memory.writer import CheckpointWriter
from node.runtime.generation import CachedContext, SamplingParams, generate


def _plan(engine, store: CheckpointStore, agent: str, blocks: int):
    context = CachedContext(engine.make_caches())
    prompt = engine.encode("the cat sat on the mat and the dog sat on a mat " * 60)[: blocks * BLOCK_TOKENS]
    generate(engine, context, prompt, SamplingParams(max_tokens=1))
    return store.plan(agent, context.tokens, context.caches, (), 0, {"turn": 1})


@pytest.mark.parametrize("model_busy", [False, True])
def test_the_writer_paces_its_blocks_only_while_the_model_is_busy(
    tiny_engine, tmp_path, monkeypatch, model_busy
):
    rests: list[float] = []
    monkeypatch.setattr(writer_module.time, "sleep", rests.append)
    store = CheckpointStore(tmp_path, tiny_engine.info.fingerprint)
    plan = _plan(tiny_engine, store, "a", blocks=3)
    writer = CheckpointWriter(store, model_busy=lambda: model_busy)
    done = threading.Event()
    results = []
    writer.submit(plan, lambda result: (results.append(result), done.set()))
    assert done.wait(60)
    writer.close()
    assert isinstance(results[0], float) and store.exists("a")
    if model_busy:  # every block after the first waits its turn; the first is written at once
        written = [b for b in plan.new_blocks if b.rows is not None]
        assert len(rests) == len(written) - 1 >= 2
        assert all(0 < r <= writer_module.Pacer.MAX_REST_S for r in rests)
    else:
        assert rests == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux schedules threads as tasks")
def test_the_writer_thread_runs_in_the_idle_scheduling_class(tiny_engine, tmp_path):
    store = CheckpointStore(tmp_path, tiny_engine.info.fingerprint)
    writer = CheckpointWriter(store)
    seen = {}

    def probe(result) -> None:  # called on the writer's thread once the plan is committed
        seen["policy"] = os.sched_getscheduler(threading.get_native_id())

    writer.submit(_plan(tiny_engine, store, "a", blocks=1), probe)
    writer.wait()
    writer.close()
    assert seen["policy"] == os.SCHED_IDLE

"""Scenario 7: the memory engine's own figures (issue 15), each measured in this run.

- interleaved: three conversations under one system prompt, turns interleaved, through the same
  conversation index the Anthropic and OpenAI APIs use: the share of each previous prompt reused;
- shared prefix: 100 contexts, each a short question under one 2k-token playbook: bytes on disk
  against the playbook's bytes plus the contexts' own tokens;
- storage: fp16 and int8 blocks restored and decoded greedily for 200 tokens against the fp32
  caches they were saved from (agreement), with bytes per token;
- decode p99: one agent's decode steps alone, then while the writer thread commits 2k-token
  checkpoints back to back.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time

from node.bench import corpus
from node.bench.results import Outcome, Table
from node.bench.workbench import Bench

REUSE_TARGET = 0.95
SHARED_DISK_TARGET = 1.2
P99_TARGET = 1.10


async def _interleaved(bench: Bench) -> dict:
    from node.memory.sessions import ConversationIndex
    from node.runtime.generation import SamplingParams

    manager = await bench.new_manager("interleaved")
    index = ConversationIndex(manager)
    engine = bench.engine
    system = corpus.document_of(engine, 600)
    chats = {name: [{"role": "system", "content": system}] for name in ("a", "b", "c")}
    shares, previous = [], {}
    try:
        for turn in range(4):
            for name, messages in chats.items():
                messages.append({"role": "user", "content": f"{corpus.question(turn)} (conversation {name})"})
                prompt = engine.encode_chat(messages)
                agent_id = await index.choose("bench-family", prompt)
                done = await manager.generate(agent_id, prompt, SamplingParams(max_tokens=8))
                index.release("bench-family", agent_id, await manager.tokens(agent_id), len(prompt))
                if name in previous:
                    shares.append(done.usage.cached_tokens / previous[name])
                previous[name] = len(prompt)
                messages.append({"role": "assistant", "content": done.text})
    finally:
        await manager.close()
    return {
        "turns": len(shares),
        "min_reuse": round(min(shares), 4),
        "mean_reuse": round(statistics.mean(shares), 4),
    }


async def _shared_prefix(bench: Bench, contexts: int = 100) -> dict:
    from node.runtime.generation import SamplingParams

    manager = await bench.new_manager("shared-prefix")
    engine = bench.engine
    playbook = corpus.tokens(engine, 2048)
    try:
        await manager.ensure_prefix("playbook", playbook, pinned=True)
        await manager.flush()
        prefix_bytes = manager.store.summary()["bytes"]
        started = time.perf_counter()
        for i in range(contexts):
            question = engine.encode(f"\n\nQuestion {i}: {corpus.question(i)}", add_bos=False)
            await manager.generate(f"ctx-{i}", playbook + question, SamplingParams(max_tokens=2))
        await manager.flush()
        seconds = time.perf_counter() - started
        usage = manager.store.usage()
    finally:
        await manager.close()
    own_tokens = usage["tokens"] - (contexts + 1) * len(playbook)
    ideal = prefix_bytes + own_tokens * prefix_bytes / len(playbook)
    return {
        "contexts": contexts,
        "prefix_tokens": len(playbook),
        "own_tokens": own_tokens,
        "bytes_on_disk": usage["bytes"],
        "prefix_plus_own_bytes": round(ideal),
        "ratio": round(usage["bytes"] / ideal, 3),
        "bytes_if_unshared": usage["bytes_if_unshared"],
        "seconds_per_context": round(seconds / contexts, 3),
    }


def _agreement(reference: tuple[int, ...], other: tuple[int, ...]) -> tuple[float, int]:
    same = sum(1 for a, b in zip(reference, other) if a == b)
    first = next((i for i, (a, b) in enumerate(zip(reference, other)) if a != b), len(reference))
    return round(same / max(len(reference), 1), 4), first


def _storage(bench: Bench, tokens: int = 2048, continuation: int = 200) -> list[dict]:
    from node.memory.checkpoint import CheckpointStore
    from node.runtime.generation import CachedContext, SamplingParams, generate

    engine = bench.engine
    prompt = corpus.tokens(engine, tokens)
    greedy = SamplingParams(max_tokens=continuation)
    context = CachedContext(engine.make_caches())
    generate(engine, context, prompt + [prompt[-1]], SamplingParams(max_tokens=1))
    saved_tokens, saved_caches = list(context.tokens), context.caches
    reference = generate(engine, CachedContext(engine.make_caches()), prompt, greedy).token_ids
    rows = []
    for storage in ("float16", "int8"):
        store = CheckpointStore(
            bench.work_dir / f"storage-{storage}", engine.info.fingerprint, storage=storage
        )
        store.save("probe", saved_tokens[:-1], saved_caches, 0, {})
        restored = store.restore("probe", engine.make_caches)
        ids = generate(engine, CachedContext(restored.caches, restored.tokens), prompt, greedy).token_ids
        share, first = _agreement(reference, ids)
        rows.append(
            {
                "storage": storage,
                "bytes_per_token": round(store.bytes_on_disk("probe") / len(restored.tokens), 1),
                "agreement": share,
                "first_divergence": first,
                "continuation": continuation,
            }
        )
    return rows


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _decode_steps(bench: Bench, manager, agent_id: str, prompt: list[int], steps: int) -> list[float]:
    from node.runtime.generation import SamplingParams

    manager.worker.step_seconds.clear()
    await manager.generate(agent_id, prompt, SamplingParams(max_tokens=steps))
    return list(manager.worker.step_seconds)[1:]  # the first step follows the prompt's prefill


async def _decode_p99(bench: Bench, steps: int = 192, rounds: int = 3) -> dict:
    """Decode step times of one agent alone and while other contexts' 2k-token checkpoints are
    committed back to back by the node's own checkpoint writer (its thread, its scheduling): every
    block written again each time, far more disk work than a node serving tasks makes. The two
    conditions alternate for `rounds` rounds, so a drift of the machine's speed falls on both."""
    from node.memory.writer import CheckpointWriter

    await asyncio.to_thread(os.sync)  # earlier scenarios' writes reach the disk before, not during
    manager = await bench.new_manager("decode-p99")
    engine = bench.engine
    prompt = corpus.tokens(engine, 512)
    alone, busy, committed = [], [], []
    try:
        await manager.generate("decoder", prompt, _one())  # warm: the prompt is cached from here on
        plans = await manager.worker.run(_big_plans, manager, engine, 4)
        writer = CheckpointWriter(manager.store, model_busy=manager.worker.busy)
        try:
            for _ in range(rounds):
                alone += await _decode_steps(bench, manager, "decoder", prompt, steps)
                busy += await _while_checkpointing(
                    manager, writer, plans, committed, _decode_steps(bench, manager, "decoder", prompt, steps)
                )
        finally:
            writer.close()
    finally:
        await manager.close()
    p99_alone, p99_busy = _percentile(alone, 0.99), _percentile(busy, 0.99)
    seconds = [c for c in committed if isinstance(c, float)]
    return {
        "steps": len(alone),
        "rounds": rounds,
        "p50_alone_ms": round(statistics.median(alone) * 1000, 2),
        "p99_alone_ms": round(p99_alone * 1000, 2),
        "p50_with_checkpoints_ms": round(statistics.median(busy) * 1000, 2),
        "p99_with_checkpoints_ms": round(p99_busy * 1000, 2),
        "p99_ratio": round(p99_busy / p99_alone, 3),
        "checkpoints_committed": len(seconds),
        "checkpoint_mean_ms": round(statistics.mean(seconds) * 1000, 1) if seconds else None,
        "writer": "node.memory.writer.CheckpointWriter (SCHED_IDLE, paced to a tenth of the time while the model is busy)",
    }


async def _while_checkpointing(manager, writer, plans, committed: list, decoding):
    """Run `decoding` while a thread keeps the writer committing `plans`, their blocks rewritten."""
    from node.memory import writer as writer_module

    stop = threading.Event()

    def feed_writer() -> None:
        writer_module.lower_priority()  # its deletions stand for the writer's own (orphans, budget)
        while not stop.is_set():
            for plan in plans:
                for block in plan.new_blocks:
                    manager.store.blocks.delete(block.ref.key)  # so every commit writes them again
                writer.submit(plan, committed.append)
                writer.wait()

    feeder = threading.Thread(target=feed_writer, name="bench-checkpoints")
    feeder.start()
    try:
        return await decoding
    finally:
        stop.set()
        await asyncio.to_thread(feeder.join)


def _one():
    from node.runtime.generation import SamplingParams

    return SamplingParams(max_tokens=1)


def _big_plans(manager, engine, count: int) -> list:
    """Save plans of `count` distinct 2k-token contexts (built on the worker: it owns MLX)."""
    from node.runtime.generation import CachedContext, SamplingParams, generate

    plans = []
    for i in range(count):
        context = CachedContext(engine.make_caches())
        prompt = engine.encode(corpus.document(200, offset=1000 * (i + 1)))[:2048]
        generate(engine, context, prompt, SamplingParams(max_tokens=1))
        plans.append(manager.store.plan(f"bench-writer-{i}", context.tokens, context.caches, (), 0, {}))
    return plans


async def run(bench: Bench) -> Outcome:
    bench.say("interleaved conversations under one system prompt ...")
    interleaved = await _interleaved(bench)
    bench.say("100 contexts under one 2k-token playbook ...")
    shared = await _shared_prefix(bench)
    bench.say("fp16 and int8 blocks: 200-token greedy agreement with the fp32 caches ...")
    storage = await asyncio.to_thread(_storage, bench)
    bench.say("decode step p99, alone and with checkpoints committed concurrently ...")
    p99 = await _decode_p99(bench)
    fp16 = next(r for r in storage if r["storage"] == "float16")
    results = {
        "interleaved": interleaved,
        "shared_prefix": shared,
        "storage": storage,
        "decode_p99": p99,
        "targets": {
            "reuse_met": interleaved["min_reuse"] >= REUSE_TARGET,
            "shared_disk_met": shared["ratio"] <= SHARED_DISK_TARGET,
            "fp16_bytes_per_token_met": fp16["bytes_per_token"] <= 18_500,
            "p99_met": p99["p99_ratio"] <= P99_TARGET,
        },
    }
    table = Table(["figure", "value", "target"])
    table.add(
        "interleaved: least share of previous prompt reused", interleaved["min_reuse"], f">= {REUSE_TARGET}"
    )
    table.add("100 contexts / (playbook + own tokens) on disk", shared["ratio"], f"<= {SHARED_DISK_TARGET}")
    for row in storage:
        table.add(
            f"{row['storage']}: bytes per token",
            row["bytes_per_token"],
            "<= 18,500" if row["storage"] == "float16" else "<= 9,500",
        )
        table.add(f"{row['storage']}: 200-token greedy agreement with fp32", row["agreement"], None)
    table.add("decode p99 alone, ms", p99["p99_alone_ms"], None)
    table.add("decode p99 with checkpoints, ms", p99["p99_with_checkpoints_ms"], f"<= {P99_TARGET}x alone")
    notes = [
        f"shared prefix: {shared['bytes_on_disk'] / 1e6:.1f} MB on disk; {shared['bytes_if_unshared'] / 1e6:.1f} MB if each context stored its own copy",
        f"{p99['checkpoints_committed']} checkpoints of 2048 tokens committed during the busy run ({p99['checkpoint_mean_ms']} ms each)",
    ]
    return Outcome(results, table, notes)

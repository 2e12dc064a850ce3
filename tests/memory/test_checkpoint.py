"""Agent memory on the tiny model: restores, shared prefixes, budgets, faults, isolation."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from node.errors import CacheLocked, DiskBudgetExceeded, MemoryBudgetExceeded
from node.memory.agents import AgentManager, AgentRequest
from node.memory.checkpoint import CheckpointStore
from node.memory.checkpoint_format import BLOCK_TOKENS
from node.model import kv_cache
from node.runtime.generation import CachedContext, SamplingParams, generate

GREEDY = SamplingParams(max_tokens=6)
TEXT = "the cat sat on the mat and the dog sat on a mat "


async def _manager(engine, root: Path, **kwargs) -> AgentManager:
    return await AgentManager.start(engine, root, **kwargs)


def _block_files(root: Path) -> list[Path]:
    return sorted((root / "blocks").glob("*/*.safetensors"))


def _cold(engine, prompt, params=GREEDY):
    return generate(engine, CachedContext(engine.make_caches()), prompt, params)


async def test_restore_matches_cold_run_and_a_follow_up_writes_only_its_own_block(tiny_engine, tmp_path):
    prompt = tiny_engine.encode(TEXT * 60)  # several blocks
    manager = await _manager(tiny_engine, tmp_path)
    await manager.generate("alpha", prompt, GREEDY)
    await manager.close()
    before = {p.name for p in _block_files(tmp_path)}

    resumed = await _manager(tiny_engine, tmp_path)
    history = await resumed.tokens("alpha")
    follow_up = history + tiny_engine.encode(" a dog", add_bos=False)
    result = await resumed.generate("alpha", follow_up, GREEDY)
    restores = resumed.stats()["agents"]["alpha"]["restores"]
    await resumed.close()
    assert result.usage.cached_tokens == len(history) and restores == 1
    assert result.token_ids == _cold(tiny_engine, follow_up).token_ids
    after = {p.name for p in _block_files(tmp_path)}
    assert len(before) == -(-len(history) // BLOCK_TOKENS)
    assert len(after - before) == 1 and len(before - after) == 1  # only the last block was regrown


async def test_diverging_history_is_restored_from_disk(tiny_engine, tmp_path):
    prompt = tiny_engine.encode(TEXT * 4)
    manager = await _manager(tiny_engine, tmp_path)
    await manager.generate("alpha", prompt, GREEDY)
    edited = prompt[:20] + tiny_engine.encode(" dog dog", add_bos=False)  # far behind the window
    result = await manager.generate("alpha", edited, GREEDY)
    restores = manager.stats()["agents"]["alpha"]["restores"]
    await manager.close()
    assert result.usage.cached_tokens == 20 and restores == 1  # the agent in memory could not rewind
    assert result.token_ids == _cold(tiny_engine, edited).token_ids
    store = CheckpointStore(tmp_path, tiny_engine.info.fingerprint)
    store.verify("alpha")
    assert store.tokens("alpha")[: len(edited)] == edited


async def test_any_agent_starts_from_the_longest_prefix_stored_anywhere(tiny_engine, tmp_path):
    system = tiny_engine.encode(TEXT * 30)
    manager = await _manager(tiny_engine, tmp_path)
    await manager.ensure_prefix("skill", system, pinned=True)
    first = system + tiny_engine.encode(" the cat " * 40, add_bos=False)
    one = await manager.generate("skill.ctx-1", first, GREEDY)
    longer = first + tiny_engine.encode(" and the dog", add_bos=False)
    two = await manager.generate("skill.ctx-2", longer, GREEDY)
    await manager.close()
    assert one.usage.cached_tokens == len(system)  # the playbook, read from its blocks
    assert two.usage.cached_tokens == len(first)  # the other conversation's whole prompt
    assert two.token_ids == _cold(tiny_engine, longer).token_ids
    store = CheckpointStore(tmp_path, tiny_engine.info.fingerprint)
    shared = set(store.path("skill")) & set(store.path("skill.ctx-1")) & set(store.path("skill.ctx-2"))
    assert len(shared) == -(-len(system) // BLOCK_TOKENS)  # every playbook block is stored once


async def test_a_scoped_context_serves_its_own_scope_and_reads_public_prefixes(tiny_engine, tmp_path):
    playbook = tiny_engine.encode(TEXT * 8)
    secret = playbook + tiny_engine.encode(" the secret plan is the cat " * 20, add_bos=False)
    manager = await _manager(tiny_engine, tmp_path)
    await manager.ensure_prefix("skill", playbook, pinned=True)
    first = await manager.generate("key-a.1", secret, GREEDY, scope="key-a")
    probe = await manager.generate("key-b.1", secret, GREEDY, scope="key-b")
    again = await manager.generate("key-a.2", secret, GREEDY, scope="key-a")
    await manager.close()
    assert first.usage.cached_tokens == len(playbook)  # the public playbook
    assert probe.usage.cached_tokens == len(playbook)  # not key a's conversation
    assert again.usage.cached_tokens == len(secret) - 1  # its own scope's


async def test_interleaved_conversations_keep_their_own_histories(tiny_engine, tmp_path):
    system = tiny_engine.encode(TEXT * 10)
    manager = await _manager(tiny_engine, tmp_path)
    histories = {name: system + tiny_engine.encode(f" {name}", add_bos=False) for name in ("a", "b", "c")}
    for turn in range(3):
        for name, history in list(histories.items()):
            prompt = history + tiny_engine.encode(f" turn {turn}", add_bos=False)
            result = await manager.generate(f"chat.{name}", prompt, GREEDY)
            if turn:
                # nothing rewound (the reply's last token is not fed to the model yet)
                assert result.usage.cached_tokens >= len(history) - 1
            histories[name] = prompt + list(result.token_ids)
    await manager.close()


async def test_contexts_sharing_a_prefix_store_it_once(tiny_engine, tmp_path):
    prefix = tiny_engine.encode(TEXT * 60)[: 4 * BLOCK_TOKENS]
    manager = await _manager(tiny_engine, tmp_path)
    await manager.ensure_prefix("playbook", prefix, pinned=True)
    await manager.flush()
    prefix_bytes = manager.store.summary()["bytes"]
    for i in range(10):
        await manager.generate(
            f"ctx-{i}", prefix + tiny_engine.encode(f" question {i}", add_bos=False), GREEDY
        )
    await manager.flush()
    usage = manager.store.usage()
    await manager.close()
    own = usage["tokens"] - 11 * len(prefix)
    per_token = prefix_bytes / len(prefix)
    assert usage["bytes"] <= 1.2 * (prefix_bytes + own * per_token)
    assert usage["bytes_if_unshared"] > 5 * usage["bytes"]


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "manifest", "version", "missing-block"])
async def test_damaged_contexts_are_refused_and_kept_aside(tiny_engine, tmp_path, damage):
    prompt = tiny_engine.encode(TEXT * 2)
    manager = await _manager(tiny_engine, tmp_path)
    await manager.generate("alpha", prompt, GREEDY)
    await manager.close()
    store = CheckpointStore(tmp_path, tiny_engine.info.fingerprint)
    manifest_path = store.manifest_path("alpha")
    block = store.blocks.path(store.path("alpha")[0].key)
    if damage == "truncate":
        block.write_bytes(block.read_bytes()[: block.stat().st_size // 2])
    elif damage == "bitflip":
        data = bytearray(block.read_bytes())
        data[-100] ^= 0x01
        block.write_bytes(bytes(data))
    elif damage == "missing-block":
        block.unlink()
    elif damage == "manifest":
        manifest_path.write_text("{not json")
    else:
        manifest = json.loads(manifest_path.read_text())
        manifest_path.write_text(json.dumps({**manifest, "format_version": 99}))

    resumed = await _manager(tiny_engine, tmp_path)
    result = await resumed.generate("alpha", prompt, GREEDY)
    refused = resumed.stats()["refused_checkpoints"]
    await resumed.close()
    assert result.usage.cached_tokens == 0  # started cold
    assert result.token_ids == _cold(tiny_engine, prompt).token_ids
    assert len(refused) == 1 and refused[0]["agent_id"] == "alpha"
    kept = Path(refused[0]["kept_in"])
    assert (kept / "REASON.txt").exists() and any(kept.glob("*.json"))


async def test_a_damaged_shared_playbook_block_is_set_aside_and_new_conversations_start_cold(
    tiny_engine, tmp_path
):
    playbook = tiny_engine.encode(TEXT * 12)
    manager = await _manager(tiny_engine, tmp_path)
    await manager.ensure_prefix("skill", playbook, pinned=True)
    await manager.close()
    store = CheckpointStore(tmp_path, tiny_engine.info.fingerprint)
    key = store.path("skill")[0].key
    block, head = store.blocks.path(key), store.blocks.open(key).head_bytes()
    data = bytearray(block.read_bytes())
    data[head - 64] ^= 0x10  # in a global layer's values, which every restore of the skill reads
    block.write_bytes(bytes(data))

    resumed = await _manager(tiny_engine, tmp_path)
    prompt = playbook + tiny_engine.encode(" the dog", add_bos=False)
    result = await resumed.generate("skill.ctx-1", prompt, GREEDY)
    refused = resumed.stats()["refused_checkpoints"]
    await resumed.close()
    assert result.usage.cached_tokens == 0 and result.token_ids == _cold(tiny_engine, prompt).token_ids
    assert [r["agent_id"] for r in refused] == ["skill"]
    assert (tmp_path / "quarantine" / "blocks" / block.name).exists()


async def test_format_1_checkpoints_are_refused_with_a_clear_message(tiny_engine, tmp_path, caplog):
    legacy = tmp_path / "agents" / "alpha-0123"
    legacy.mkdir(parents=True)
    (legacy / "manifest.json").write_text(json.dumps({"format_version": 1, "agent_id": "alpha"}))
    manager = await _manager(tiny_engine, tmp_path)
    result = await manager.generate("alpha", tiny_engine.encode(TEXT), GREEDY)
    await manager.close()
    assert result.usage.cached_tokens == 0
    assert "use format 1" in caplog.text and "no longer reads" in caplog.text
    assert CheckpointStore(tmp_path, None).usage()["legacy_checkpoints"] == 1


async def test_context_of_another_model_is_refused(tiny_engine, tmp_path):
    prompt = tiny_engine.encode(TEXT)
    manager = await _manager(tiny_engine, tmp_path)
    await manager.generate("alpha", prompt, GREEDY)
    await manager.close()
    other = CheckpointStore(tmp_path, "another-model-fingerprint")
    with pytest.raises(Exception, match="not by the loaded model"):
        other.restore("alpha", tiny_engine.make_caches)
    kept = other.quarantine("alpha", "test")
    assert not other.exists("alpha") and (kept / "REASON.txt").read_text() == "test\n"


async def test_lru_eviction_checkpoints_and_restores(tiny_engine, tmp_path):
    manager = await _manager(tiny_engine, tmp_path, max_agents=2)
    prompts = {f"agent-{i}": tiny_engine.encode(f"{i} {TEXT}") for i in range(4)}
    for agent_id, prompt in prompts.items():
        await manager.generate(agent_id, prompt, GREEDY)
    stats = manager.stats()
    assert stats["agents_in_memory"] == 2 and set(stats["agents"]) == {"agent-2", "agent-3"}
    assert stats["on_disk"]["contexts"] == 4
    again = await manager.generate("agent-0", prompts["agent-0"], GREEDY)
    assert again.usage.cached_tokens == len(prompts["agent-0"]) - 1
    assert manager.stats()["agents"]["agent-0"]["restores"] == 1
    await manager.close()


async def test_memory_budget_evicts_and_counts_running_tasks(tiny_engine, tmp_path):
    one_context = tiny_engine.kv_memory_bytes(len(tiny_engine.encode(TEXT)) + GREEDY.max_tokens)
    manager = await _manager(tiny_engine, tmp_path, memory_budget_bytes=int(1.5 * one_context))
    for i in range(3):
        await manager.generate(f"agent-{i}", tiny_engine.encode(TEXT), GREEDY)
    assert manager.stats()["agents_in_memory"] == 1
    huge = tiny_engine.encode(TEXT * 40)
    with pytest.raises(MemoryBudgetExceeded, match="memory budget"):
        await manager.generate("huge", huge, GREEDY)
    ok = await manager.generate("agent-0", tiny_engine.encode(TEXT), GREEDY)  # the node still serves
    await manager.close()
    assert ok.usage.cached_tokens > 0


async def test_disk_budget_evicts_least_recently_used_unpinned_contexts(tiny_engine, tmp_path):
    playbook = tiny_engine.encode(TEXT * 30)
    probe = await _manager(tiny_engine, tmp_path / "probe")
    await probe.ensure_prefix("p", playbook)
    await probe.flush()
    per_token = probe.store.summary()["bytes"] / len(playbook)
    await probe.close()
    context_tokens = len(tiny_engine.encode("0 " + TEXT * 25)) + GREEDY.max_tokens
    budget = int(per_token * (len(playbook) + 2.5 * context_tokens))
    manager = await _manager(tiny_engine, tmp_path / "cache", disk_budget_bytes=budget, max_agents=1)
    await manager.ensure_prefix("playbook", playbook, pinned=True)
    for i in range(6):
        await manager.generate(f"ctx-{i}", tiny_engine.encode(f"{i} " + TEXT * 25), GREEDY)
    await manager.flush()
    summary = manager.store.summary()
    kept = set(manager.store.index().contexts())
    with pytest.raises(DiskBudgetExceeded, match="disk budget"):
        await manager.generate("too-big", tiny_engine.encode(TEXT * 200), GREEDY)
    await manager.close()
    assert summary["bytes"] <= budget and summary["evicted_contexts"] >= 2
    assert "playbook" in kept and "ctx-5" in kept and "ctx-0" not in kept


async def test_a_second_process_cannot_serve_the_same_cache(tiny_engine, tmp_path):
    manager = await _manager(tiny_engine, tmp_path)
    with pytest.raises(CacheLocked, match="another node process"):
        await _manager(tiny_engine, tmp_path)
    other = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "node", "cache", "rm", "alpha", "--cache-dir", str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    await manager.close()
    assert other.returncode != 0 and "another node process" in other.stderr + other.stdout
    again = await _manager(tiny_engine, tmp_path)  # released at close
    await again.close()


@pytest.mark.parametrize("storage,tolerance", [("float16", 2e-3), ("bfloat16", 2e-2), ("int8", 2e-2)])
async def test_storage_dtypes_round_trip(tiny_engine, tmp_path, storage, tolerance):
    prompt = tiny_engine.encode(TEXT * 6)
    context = CachedContext(tiny_engine.make_caches())
    generate(tiny_engine, context, prompt, SamplingParams(max_tokens=1))
    store = CheckpointStore(tmp_path, tiny_engine.info.fingerprint, storage=storage)
    store.save("x", context.tokens, context.caches, 0, {})
    restored = store.restore("x", tiny_engine.make_caches)
    assert restored.tokens == context.tokens
    for original, loaded in zip(context.caches, restored.caches):
        start = loaded.base
        a = np.array(original.keys[..., start - original.base : original.offset - original.base, :])
        b = np.array(loaded.keys[..., : loaded.offset - loaded.base, :])
        assert np.max(np.abs(a - b)) <= tolerance * max(1.0, np.max(np.abs(a)))


def test_a_planned_save_holds_its_own_copy_of_the_rows(tiny_engine, tmp_path):
    """The plan reads the caches' buffers in place (numpy over their memory) and must copy: later
    steps write those buffers in place while the writer thread has yet to commit."""
    context = CachedContext(tiny_engine.make_caches())
    generate(tiny_engine, context, tiny_engine.encode(TEXT * 3), GREEDY)
    store = CheckpointStore(tmp_path, tiny_engine.info.fingerprint)
    plan = store.plan("alpha", context.tokens, context.caches, (), 0, {})
    planned = [rows for block in plan.new_blocks for rows in block.rows]
    read = [_token_major(kv_cache.positions(c, 0, c.offset)) for c in context.caches]  # through MLX
    assert len(planned) == len(read) and all(_equal(p, r) for p, r in zip(planned, read))
    for cache in context.caches:  # what a later step's in-place write could do to the buffers
        np.asarray(memoryview(cache.keys))[...] = 0
        np.asarray(memoryview(cache.values))[...] = 0
    assert all(_equal(p, r) for p, r in zip(planned, read))
    store.commit(plan)
    restored = store.restore("alpha", tiny_engine.make_caches)
    assert restored.tokens == context.tokens
    for cache, (keys, values) in zip(restored.caches, read, strict=True):  # stored as float16
        kept = _token_major(kv_cache.positions(cache, cache.base, cache.offset))
        np.testing.assert_allclose(kept[0], keys[cache.base : cache.offset], rtol=1e-2, atol=1e-3)
        np.testing.assert_allclose(kept[1], values[cache.base : cache.offset], rtol=1e-2, atol=1e-3)


def _token_major(pair) -> tuple[np.ndarray, np.ndarray]:
    return tuple(np.array(a[0]).transpose(1, 0, 2) for a in pair)


def _equal(pair, other) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(pair, other, strict=True))


def test_a_full_disk_keeps_the_previous_checkpoint_and_no_garbage(tiny_engine, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)], check=False, capture_output=True
    ).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root) to fill a real disk")
    try:
        context = CachedContext(tiny_engine.make_caches())
        generate(tiny_engine, context, tiny_engine.encode(TEXT * 4), SamplingParams(max_tokens=1))
        store = CheckpointStore(mount, tiny_engine.info.fingerprint)
        store.open_for_serving()
        store.save("alpha", context.tokens, context.caches, 0, {"turn": 1})
        saved = store.tokens("alpha")
        generate(
            tiny_engine,
            context,
            context.tokens + tiny_engine.encode(TEXT * 200, add_bos=False),
            SamplingParams(max_tokens=1),
        )
        with pytest.raises(OSError):
            store.save("alpha", context.tokens, context.caches, len(saved), {"turn": 2})
        assert store.tokens("alpha") == saved and store.manifest("alpha")["metadata"] == {"turn": 1}
        store.verify("alpha")
        assert not list(mount.rglob("*.tmp"))
        assert {p.stem for p in _block_files(mount)} == {ref.key for ref in store.path("alpha")}
        store.close()
    finally:
        subprocess.run(["umount", str(mount)], check=False)


async def test_concurrent_agents_stay_isolated(tiny_engine, tmp_path):
    manager = await _manager(tiny_engine, tmp_path)
    prompts = [tiny_engine.encode(f"{TEXT} {w}") for w in ("cat", "dog", "mat")]
    results = await manager.generate_concurrent(
        [AgentRequest(f"c{i}", p, GREEDY) for i, p in enumerate(prompts)]
    )
    for prompt, result in zip(prompts, results):
        assert result.token_ids == _cold(tiny_engine, prompt).token_ids
    # Two tasks for one agent never interleave: both complete and the cache is consistent.
    same = await asyncio.gather(*(manager.generate("c0", p, GREEDY) for p in prompts))
    assert [r.usage.prompt_tokens for r in same] == [len(p) for p in prompts]
    assert await manager.tokens("c0") == prompts[2] + list(same[2].token_ids[:-1])
    await manager.close()


KILL_LOOP = """
import asyncio, sys
from node.model.engine import Engine
from node.memory.agents import AgentManager
from node.runtime.generation import SamplingParams
engine = Engine.load(sys.argv[1], progress=lambda m: None, cache_root=sys.argv[3])
async def main():
    manager = await AgentManager.start(engine, sys.argv[2])
    prompt = engine.encode("the cat sat on the mat " * 30)
    while True:
        prompt = prompt + engine.encode(" the dog" * 20, add_bos=False)
        await manager.generate("victim", prompt, SamplingParams(max_tokens=2))
        await manager.flush()
        print("saved", flush=True)
asyncio.run(main())
"""


def test_sigkill_at_any_moment_keeps_a_valid_checkpoint_and_leaves_no_garbage(
    tiny_gguf, tiny_engine, model_cache, tmp_path
):
    for delay in (0.05, 0.13, 0.21, 0.34, 0.55):
        process = subprocess.Popen(
            [sys.executable, "-c", KILL_LOOP, str(tiny_gguf), str(tmp_path), str(model_cache)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        assert process.stdout.readline().strip() == "saved"  # a checkpoint exists; more are being written
        time.sleep(delay)  # the moment of the kill varies; nothing waits for a condition here
        process.send_signal(signal.SIGKILL)
        process.wait()
        store = CheckpointStore(tmp_path, tiny_engine.info.fingerprint)
        store.open_for_serving()  # cleans up what the kill left behind
        store.verify("victim")
        restored = store.restore("victim", tiny_engine.make_caches)
        assert len(restored.tokens) == store.manifest("victim")["token_count"]
        assert not list(tmp_path.rglob("*.tmp"))
        assert {p.stem for p in _block_files(tmp_path)} == {ref.key for ref in store.path("victim")}
        store.close()


def test_a_block_stores_its_whole_history_layers_first_as_plain_safetensors(tmp_path):
    from safetensors.numpy import load_file

    from node.errors import BlockStoreUnavailable, CheckpointCorrupt
    from node.memory.blocks import BlockStore

    blocks, key = BlockStore(tmp_path), "ab" * 16
    layers = [(np.full((4, 1, 8), i, np.float32), np.full((4, 1, 8), -i, np.float32)) for i in range(4)]
    blocks.write(key, None, "float16", np.arange(4), layers, history_layers=(2,))
    loaded = load_file(blocks.path(key))  # the safetensors package reads it (and checks its layout)
    assert sorted(loaded) == sorted(["tokens", *(f"{kind}.{i}" for i in range(4) for kind in "kv")])
    assert (loaded["k.2"] == 2).all() and (loaded["v.3"] == -3).all()

    block = blocks.open(key)
    head = block.head_bytes()
    block.close()
    blocks.partial_path(key).write_bytes(blocks.path(key).read_bytes()[:head])
    blocks.path(key).rename(tmp_path / "whole")
    asked = []
    blocks.complete = lambda wanted: asked.append(wanted) or tmp_path / "whole"
    partial = blocks.open(key)
    assert sorted(partial.present()) == ["k.2", "tokens", "v.2"]  # the head: tokens, then layer 2
    assert (partial.tensor("v.2") == -2).all() and asked == []
    assert (partial.tensor("k.0") == 0).all() and asked == [key]  # past the head: the rest is fetched
    partial.close()
    blocks.complete = None  # a node serving without its block store
    partial = blocks.open(key)
    assert (partial.tensor("k.2") == 2).all()
    with pytest.raises(BlockStoreUnavailable):
        partial.tensor("k.0")
    partial.close()
    blocks.delete(key)
    with pytest.raises(CheckpointCorrupt):
        blocks.open(key)

"""Checkpoint store and agent manager on the tiny model: restores, faults, eviction, isolation."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.memory.agent_ids import agent_dirname
from node.memory.agents import AgentManager, AgentRequest
from node.memory.checkpoint import CheckpointStore
from node.runtime.generation import CachedContext, SamplingParams, generate

GREEDY = SamplingParams(max_tokens=6)
TEXT = "the cat sat on the mat and the dog sat on a mat "


async def _manager(engine, root: Path, **kwargs) -> AgentManager:
    return await AgentManager.start(engine, root, **kwargs)


def _segments(root: Path, agent_id: str) -> list[Path]:
    return sorted((root / "agents" / agent_dirname(agent_id)).glob("seg-*.safetensors"))


async def test_restore_matches_cold_run_and_saves_only_new_tokens(tiny_engine, tmp_path):
    prompt = tiny_engine.encode(TEXT * 4)
    manager = await _manager(tiny_engine, tmp_path)
    await manager.generate("alpha", prompt, GREEDY)
    first_segment_bytes = _segments(tmp_path, "alpha")[0].stat().st_size
    await manager.close()

    resumed = await _manager(tiny_engine, tmp_path)
    history = await resumed.tokens("alpha")
    follow_up = history + tiny_engine.encode(" a dog", add_bos=False)
    result = await resumed.generate("alpha", follow_up, GREEDY)
    restores = resumed.stats()["agents"]["alpha"]["restores"]
    await resumed.close()
    assert result.usage.cached_tokens == len(history) and restores == 1
    cold = generate(tiny_engine, CachedContext(tiny_engine.make_caches()), follow_up, GREEDY)
    assert result.token_ids == cold.token_ids
    segments = _segments(tmp_path, "alpha")
    assert len(segments) == 2 and segments[1].stat().st_size < first_segment_bytes / 5


async def test_diverging_history_is_restored_from_disk(tiny_engine, tmp_path):
    prompt = tiny_engine.encode(TEXT * 4)
    manager = await _manager(tiny_engine, tmp_path)
    await manager.generate("alpha", prompt, GREEDY)
    edited = prompt[:20] + tiny_engine.encode(" dog dog", add_bos=False)  # far behind the window
    result = await manager.generate("alpha", edited, GREEDY)
    restores = manager.stats()["agents"]["alpha"]["restores"]
    await manager.close()
    assert result.usage.cached_tokens == 20 and restores == 1  # the agent in memory could not rewind
    cold = generate(tiny_engine, CachedContext(tiny_engine.make_caches()), edited, GREEDY)
    assert result.token_ids == cold.token_ids
    store = CheckpointStore(tmp_path, tiny_engine.info.fingerprint)
    store.verify("alpha")
    assert store.tokens("alpha")[: len(edited)] == edited


async def test_new_agent_forks_from_base_agent(tiny_engine, tmp_path):
    system = tiny_engine.encode(TEXT * 2)
    manager = await _manager(tiny_engine, tmp_path)
    await manager.ensure_prefix("skill", system)
    prompt = system + tiny_engine.encode(" the cat", add_bos=False)
    result = await manager.generate("skill.ctx-1", prompt, GREEDY, base_agent="skill")
    await manager.close()
    assert result.usage.cached_tokens == len(system)
    assert await manager.metadata("skill") == {}


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "manifest", "version"])
async def test_damaged_checkpoints_are_refused_and_kept_aside(tiny_engine, tmp_path, damage):
    prompt = tiny_engine.encode(TEXT * 2)
    manager = await _manager(tiny_engine, tmp_path)
    await manager.generate("alpha", prompt, GREEDY)
    await manager.close()
    folder = tmp_path / "agents" / agent_dirname("alpha")
    segment = _segments(tmp_path, "alpha")[0]
    if damage == "truncate":
        segment.write_bytes(segment.read_bytes()[: segment.stat().st_size // 2])
    elif damage == "bitflip":
        data = bytearray(segment.read_bytes())
        data[-100] ^= 0x01
        segment.write_bytes(bytes(data))
    elif damage == "manifest":
        (folder / "manifest.json").write_text("{not json")
    else:
        manifest = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))

    resumed = await _manager(tiny_engine, tmp_path)
    result = await resumed.generate("alpha", prompt, GREEDY)
    refused = resumed.stats()["refused_checkpoints"]
    await resumed.close()
    assert result.usage.cached_tokens == 0  # started cold
    assert len(refused) == 1 and refused[0]["agent_id"] == "alpha"
    kept = Path(refused[0]["kept_in"])
    assert kept.exists() and (kept / "REASON.txt").exists() and any(kept.glob("seg-*"))


async def test_checkpoint_of_another_model_is_refused(tiny_engine, tmp_path):
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
    prompts = {f"agent-{i}": tiny_engine.encode(f"{TEXT} {i}") for i in range(4)}
    for agent_id, prompt in prompts.items():
        await manager.generate(agent_id, prompt, GREEDY)
    stats = manager.stats()
    assert stats["agents_in_memory"] == 2 and set(stats["agents"]) == {"agent-2", "agent-3"}
    assert stats["on_disk"]["agents"] == 4
    again = await manager.generate("agent-0", prompts["agent-0"], GREEDY)
    assert again.usage.cached_tokens == len(prompts["agent-0"]) - 1
    assert manager.stats()["agents"]["agent-0"]["restores"] == 1
    await manager.close()


async def test_memory_budget_evicts(tiny_engine, tmp_path):
    manager = await _manager(tiny_engine, tmp_path, memory_budget_bytes=1)
    for i in range(3):
        await manager.generate(f"agent-{i}", tiny_engine.encode(TEXT), GREEDY)
    assert manager.stats()["agents_in_memory"] == 1
    await manager.close()


async def test_concurrent_agents_stay_isolated(tiny_engine, tmp_path):
    manager = await _manager(tiny_engine, tmp_path)
    prompts = [tiny_engine.encode(f"{TEXT} {w}") for w in ("cat", "dog", "mat")]
    results = await manager.generate_concurrent(
        [AgentRequest(f"c{i}", p, GREEDY) for i, p in enumerate(prompts)]
    )
    for prompt, result in zip(prompts, results):
        cold = generate(tiny_engine, CachedContext(tiny_engine.make_caches()), prompt, GREEDY)
        assert result.token_ids == cold.token_ids
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
        prompt = prompt + engine.encode(" the dog", add_bos=False)
        await manager.generate("victim", prompt, SamplingParams(max_tokens=2))
        print("saved", flush=True)
asyncio.run(main())
"""


def test_sigkill_during_checkpoint_writes_keeps_a_valid_checkpoint(
    tiny_gguf, tiny_engine, model_cache, tmp_path
):
    store = CheckpointStore(tmp_path, tiny_engine.info.fingerprint)
    for delay in (0.05, 0.13, 0.21, 0.34, 0.55):
        process = subprocess.Popen(
            [sys.executable, "-c", KILL_LOOP, str(tiny_gguf), str(tmp_path), str(model_cache)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        assert process.stdout.readline().strip() == "saved"  # a checkpoint exists; more are being written
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        store.verify("victim")  # whatever the moment of the kill, the listed checkpoint is whole
        restored = store.restore("victim", tiny_engine.make_caches)
        assert len(restored.tokens) == store.manifest("victim")["token_count"]

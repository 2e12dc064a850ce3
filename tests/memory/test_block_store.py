"""The shared block store on a real SeaweedFS (S3 gateway on loopback), tiny model, in process:
write-back after commits, pulls with digests checked, versioned manifests, deduplication across
nodes, an outage (serving from local disk, retried) and a corrupted object refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import pytest

from node.memory.agents import AgentManager
from node.memory.checkpoint import CheckpointStore
from node.memory.checkpoint_format import BLOCK_TOKENS
from node.memory.partial_blocks import COMPLETE_THREADS
from node.memory.remote_store import ObjectStore
from node.memory.sync import PACK_BLOCKS, RemoteTier, window_start
from node.runtime.generation import SamplingParams
from tests.seaweedfs import s3_client, s3_environment, seaweedfs, weed_unusable
from tests.tiny_models import WINDOW

pytestmark = pytest.mark.skipif(weed_unusable() is not None, reason=str(weed_unusable()))
GREEDY = SamplingParams(max_tokens=6)
TEXT = "the cat sat on the mat and the dog sat on a mat "


@pytest.fixture(scope="module")
def weed():
    with seaweedfs() as server:
        yield server


@pytest.fixture
def bucket(weed, monkeypatch, request) -> str:
    for name, value in s3_environment(weed.endpoint).items():
        monkeypatch.setenv(name, value)
    return f"s3://agents/{request.node.name[:40]}"


def _wait(condition, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
    return value


async def _node(engine, root: Path, bucket: str) -> AgentManager:
    return await AgentManager.start(engine, root, block_store=bucket)


async def test_a_context_run_on_one_node_resumes_on_another_from_the_store(tiny_engine, tmp_path, bucket):
    prompt = tiny_engine.encode(TEXT * 40)
    one = await _node(tiny_engine, tmp_path / "one", bucket)
    first = await one.generate("alpha", prompt, GREEDY, metadata={"turn": 1})
    history = await one.tokens("alpha")
    await one.close()  # flushes the write-back
    assert one.remote.status()["manifests_uploaded"] >= 1 and one.remote.status()["pending_contexts"] == 0

    two = await _node(tiny_engine, tmp_path / "two", bucket)
    assert await two.metadata("alpha") == {"turn": 1}  # pulled before it is read
    # the prefix index took the pulled blocks' token ids from the pull's checks
    assert two.store.longest_prefix(history).length == len(history)
    follow_up = history + tiny_engine.encode(" and the dog", add_bos=False)
    second = await two.generate("alpha", follow_up, GREEDY)
    status = two.remote.status()
    await two.close()
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens == len(history)  # no prefill of the history
    assert status["last_pull"]["tokens"] == len(history) and status["downloaded_blocks"] >= 1
    assert set(status["last_pull"]["phases"]) == {"manifest", "transfer", "adopt"}  # shown by /health


async def test_nodes_sharing_a_playbook_store_its_blocks_once_and_versions_only_grow(
    tiny_engine, tmp_path, bucket
):
    playbook = tiny_engine.encode(TEXT * 30)
    for name in ("a", "b", "c"):
        node = await _node(tiny_engine, tmp_path / name, bucket)
        await node.ensure_prefix("skill", playbook, pinned=True)
        await node.close()
    remote = ObjectStore(bucket)
    stored = remote.bytes_stored()
    local = sum(p.stat().st_size for p in (tmp_path / "a" / "blocks").glob("*/*.safetensors"))
    assert stored["block_bytes"] == local  # three nodes, one copy
    # each node committed the playbook once, later than the one before: three versions, never
    # overwritten, the two newest kept
    assert remote.versions("skill") == [2, 3]


async def test_an_older_state_never_replaces_a_newer_one(tiny_engine, tmp_path, bucket):
    remote = ObjectStore(bucket)
    remote.ensure_bucket()
    manifest = {"agent_id": "beta", "updated": 100.0, "token_count": 0, "blocks": []}
    assert remote.put_manifest("beta", 1, manifest)
    assert not remote.put_manifest("beta", 1, {**manifest, "updated": 50.0})  # conditional put
    assert remote.latest_manifest("beta")["updated"] == 100.0


async def test_a_malformed_version_in_the_store_is_passed_over(tiny_engine, tmp_path, bucket):
    """Whoever can write to the bucket cannot make a node write outside its cache folder."""
    history = await _uploaded_context(tiny_engine, tmp_path / "one", bucket, "kappa")
    remote = ObjectStore(bucket)
    latest = remote.latest_manifest("kappa")
    escape = {**latest["blocks"][0], "key": "../../../../escaped"}
    bad = {**latest, "updated": latest["updated"] + 1, "blocks": [escape, *latest["blocks"][1:]]}
    assert remote.put_manifest("kappa", latest["version"] + 1, bad)
    assert remote.latest_manifest("kappa")["version"] == latest["version"]  # the older, sound one

    two = await _node(tiny_engine, tmp_path / "deep" / "er" / "two", bucket)
    result = await two.generate("kappa", history + tiny_engine.encode(" next", add_bos=False), GREEDY)
    await two.close()
    assert result.usage.cached_tokens == len(history)
    assert not list(tmp_path.rglob("escaped*"))
    assert remote.latest_manifest("kappa")["version"] == latest["version"] + 2  # written past it


async def test_an_unreachable_store_leaves_serving_local_and_uploads_later(
    tiny_engine, tmp_path, weed, bucket
):
    node = await _node(tiny_engine, tmp_path / "one", bucket)
    weed.stop()
    try:
        prompt = tiny_engine.encode(TEXT * 10)
        result = await node.generate("gamma", prompt, GREEDY)  # served; the upload waits
        _wait(lambda: node.remote.status()["reachable"] is False)
        history = await node.tokens("gamma")
        # the next task of that context does not wait for its upload either
        again = await node.generate("gamma", history + tiny_engine.encode(" again", add_bos=False), GREEDY)
        assert result.text is not None and again.usage.cached_tokens == len(history)
        assert node.remote.status()["pending_contexts"] == 1  # the two saves coalesced
    finally:
        weed.start()
    _wait(lambda: node.remote.status()["pending_contexts"] == 0)
    assert node.remote.status()["reachable"] is True
    await node.close()
    assert ObjectStore(bucket).versions("gamma") == [1]


async def test_a_damaged_block_in_the_store_is_refused(tiny_engine, tmp_path, weed, bucket):
    prompt = tiny_engine.encode(TEXT * 20)
    one = await _node(tiny_engine, tmp_path / "one", bucket)
    await one.generate("delta", prompt, GREEDY)
    await one.close()
    remote = ObjectStore(bucket)
    first = remote.latest_manifest("delta")["blocks"][0]
    head = remote.block_key(first["key"], "head")  # the part a pull fetches
    client = s3_client(weed.endpoint)
    body = bytearray(client.get_object(Bucket="agents", Key=head)["Body"].read())
    assert len(body) == first["split"]
    body[-10] ^= 0xFF  # a global layer's values
    client.put_object(Bucket="agents", Key=head, Body=bytes(body))

    two = await _node(tiny_engine, tmp_path / "two", bucket)
    result = await two.generate("delta", prompt + tiny_engine.encode(" more", add_bos=False), GREEDY)
    await two.close()
    assert result.usage.cached_tokens == 0  # started cold, answered
    CheckpointStore(tmp_path / "two", tiny_engine.info.fingerprint).verify("delta")  # its own, sound
    # the damaged object was deleted, and node two uploaded its own copy of that block
    assert client.get_object(Bucket="agents", Key=head)["Body"].read() != bytes(body)


async def test_a_copy_in_memory_gives_way_to_a_newer_turn_run_elsewhere(tiny_engine, tmp_path, bucket):
    one = await _node(tiny_engine, tmp_path / "one", bucket)
    two = await _node(tiny_engine, tmp_path / "two", bucket)
    try:
        prompt = tiny_engine.encode(TEXT * 12)
        await one.generate("eps", prompt, GREEDY, metadata={"turn": 1})  # stays in one's memory
        await one.flush()
        assert one.remote.flush(30)
        history = await two.tokens("eps")  # pulled from the store
        await two.generate(
            "eps", history + tiny_engine.encode(" two", add_bos=False), GREEDY, metadata={"turn": 2}
        )
        await two.flush()
        assert two.remote.flush(30)
        assert await one.metadata("eps") == {"turn": 2}  # one's copy in memory was older
        newer = await two.tokens("eps")
        third = await one.generate("eps", newer + tiny_engine.encode(" one", add_bos=False), GREEDY)
    finally:
        await one.close()
        await two.close()
    assert third.usage.cached_tokens == len(newer)


def _blocked_completer(tier) -> threading.Event:
    """Hold the tier's background completions until the returned event is set."""
    release = threading.Event()
    for _ in range(COMPLETE_THREADS):
        tier.partial._completer.submit(release.wait)
    return release


def _same_caches(mine: list, theirs: list) -> bool:
    return all(
        mx.array_equal(a.keys, b.keys) and mx.array_equal(a.values, b.values)
        for a, b in zip(mine, theirs, strict=True)
    )


def _pulling_store(engine, root: Path, bucket: str) -> tuple[CheckpointStore, RemoteTier]:
    store = CheckpointStore(root, engine.info.fingerprint)
    store.open_for_serving()
    return store, RemoteTier(store, ObjectStore(bucket), window_start=window_start(engine.make_caches()))


async def _uploaded_context(
    engine, root: Path, bucket: str, agent_id: str, repeats: int = 40, tokens: int | None = None
) -> list[int]:
    """A context run on a node and uploaded: its history (the prompt TEXT * repeats, cut to
    `tokens` if given, and what the model generated)."""
    one = await _node(engine, root, bucket)
    await one.generate(agent_id, engine.encode(TEXT * repeats)[:tokens], GREEDY)
    history = await one.tokens(agent_id)
    await one.close()
    return history


async def test_a_pull_fetches_the_heads_of_older_blocks_first_and_the_rest_in_the_background(
    tiny_engine, tmp_path, bucket
):
    history = await _uploaded_context(tiny_engine, tmp_path / "one", bucket, "zeta")
    source = CheckpointStore(tmp_path / "one", tiny_engine.info.fingerprint)
    whole = source.restore("zeta", tiny_engine.make_caches)
    refs = source.manifest("zeta")["blocks"]
    total = sum(source.blocks.size(ref["key"]) for ref in refs)

    store, tier = _pulling_store(tiny_engine, tmp_path / "two", bucket)
    release = _blocked_completer(tier)
    try:
        pulled = tier.pull("zeta")
        older = [ref["key"] for ref in refs if ref["start"] + ref["length"] <= len(history) - WINDOW]
        assert len(older) >= 2 and pulled.tokens == len(history)
        assert pulled.bytes_downloaded < total - len(older) * 4096  # heads only, for those
        # the pulled blocks are read from memory: nothing is on disk before the restore
        assert not store.manifest_path("zeta").exists()
        assert not list((tmp_path / "two" / "blocks").rglob("*.safetensors*"))
        assert all(store.blocks.held(ref["key"]) for ref in refs)
        # the restore needs no block's rest: same tokens and caches as the source's
        resumed = store.restore("zeta", tiny_engine.make_caches)
        assert resumed.tokens == whole.tokens == history
        assert _same_caches(resumed.caches, whole.caches)
        # behind the restore the blocks land, the older ones as their heads, then the manifest
        _wait(lambda: store.manifest_path("zeta").exists())
        assert all(store.blocks.partial_path(key).exists() for key in older)
        assert tier.status()["completing_blocks"] == len(older)  # queued behind the held completer
        # a read of an older position needs a partial block's rest: the reader fetches it now
        early = len(history) // 3
        needed = next(ref["key"] for ref in refs if ref["start"] < early <= ref["start"] + ref["length"])
        assert len(store.restore("zeta", tiny_engine.make_caches, lambda t: early).tokens) == early
        assert store.blocks.exists(needed) and not store.blocks.partial_path(needed).exists()
        release.set()
        _wait(lambda: tier.status()["completing_blocks"] == 0)
    finally:
        release.set()
        tier.close()
    assert not any(store.blocks.partial_path(key).exists() for key in older)
    assert sum(store.blocks.size(ref["key"]) for ref in refs) == total
    store.verify("zeta")
    store.close()


async def test_a_pull_reads_the_heads_of_eight_older_blocks_from_one_pack(
    tiny_engine, tmp_path, weed, bucket
):
    history = await _uploaded_context(tiny_engine, tmp_path / "one", bucket, "iota", repeats=55)
    remote, client = ObjectStore(bucket), s3_client(weed.endpoint)
    manifest = remote.latest_manifest("iota")
    group = [ref["key"] for ref in manifest["blocks"][:PACK_BLOCKS]]
    assert len(manifest["blocks"]) > PACK_BLOCKS and manifest["packs"] == [group[-1]]
    assert remote.bytes_stored()["packs"] == 1
    whole = CheckpointStore(tmp_path / "one", tiny_engine.info.fingerprint).restore(
        "iota", tiny_engine.make_caches
    )

    def resumes_on(root: Path) -> None:
        store, tier = _pulling_store(tiny_engine, root, bucket)
        try:
            assert tier.pull("iota").tokens == len(history)
            resumed = store.restore("iota", tiny_engine.make_caches)
            assert resumed.tokens == history
            assert _same_caches(resumed.caches, whole.caches)
        finally:
            tier.close()
            store.close()

    heads = {
        key: client.get_object(Bucket="agents", Key=remote.block_key(key, "head"))["Body"].read()
        for key in group
    }
    for key in group:  # the pull can read these heads from the pack alone
        client.delete_object(Bucket="agents", Key=remote.block_key(key, "head"))
    resumes_on(tmp_path / "two")
    for key, body in heads.items():
        client.put_object(Bucket="agents", Key=remote.block_key(key, "head"), Body=body)
    # a damaged pack: the pull reads the heads from their own objects, and the pack is deleted
    pack = bytearray(client.get_object(Bucket="agents", Key=remote.pack_key(group[-1]))["Body"].read())
    assert bytes(pack) == b"".join(heads.values())
    pack[-10] ^= 0xFF
    client.put_object(Bucket="agents", Key=remote.pack_key(group[-1]), Body=bytes(pack))
    resumes_on(tmp_path / "three")
    assert remote.read_pack(group[-1]) is None
    # a node that computed the same blocks itself (another context, same tokens: same keys), after
    # another node stored them, packs none of its own (its floats may differ from the stored
    # blocks' rests) and names no pack the store lacks
    assert await _uploaded_context(tiny_engine, tmp_path / "four", bucket, "kappa", repeats=55) == history
    assert remote.latest_manifest("kappa")["blocks"][: len(group)] == manifest["blocks"][: len(group)]
    assert remote.read_pack(group[-1]) is None and remote.latest_manifest("kappa")["packs"] == []


async def test_a_pack_holding_blocks_of_the_window_gives_their_heads_and_their_rests_come_apart(
    tiny_engine, tmp_path, weed, bucket
):
    # PACK_BLOCKS full blocks and a few tokens: the last packed block is in the window (read whole)
    history = await _uploaded_context(
        tiny_engine, tmp_path / "one", bucket, "lambda", repeats=200, tokens=PACK_BLOCKS * BLOCK_TOKENS - 2
    )
    assert PACK_BLOCKS * BLOCK_TOKENS < len(history) < PACK_BLOCKS * BLOCK_TOKENS + WINDOW
    remote, client = ObjectStore(bucket), s3_client(weed.endpoint)
    manifest = remote.latest_manifest("lambda")
    group = [ref["key"] for ref in manifest["blocks"][:PACK_BLOCKS]]
    assert manifest["packs"] == [group[-1]]
    store, tier = _pulling_store(tiny_engine, tmp_path / "two", bucket)
    release = _blocked_completer(tier)
    try:
        objects = tier.objects(manifest)
        assert objects[:2] == [remote.pack_key(group[-1]), remote.block_key(group[-1], "rest")]
        assert not any(remote.block_key(key, "head") in objects for key in group)
        for key in group:  # the heads come from the pack alone
            client.delete_object(Bucket="agents", Key=remote.block_key(key, "head"))
        assert tier.pull("lambda").tokens == len(history)
        # the other heads wait (behind the held completer) for their rests; the last came whole
        assert tier.status()["completing_blocks"] == PACK_BLOCKS - 1
        resumed = store.restore("lambda", tiny_engine.make_caches)
        whole = CheckpointStore(tmp_path / "one", tiny_engine.info.fingerprint).restore(
            "lambda", tiny_engine.make_caches
        )
        assert resumed.tokens == history
        assert _same_caches(resumed.caches, whole.caches)
    finally:
        release.set()
        tier.close()
        store.close()


PULL_THEN_HANG = """
import sys, threading
from pathlib import Path
from node.memory import checkpoint
from node.memory.checkpoint import CheckpointStore
from node.memory.remote_store import ObjectStore
from node.memory.sync import PACK_BLOCKS, RemoteTier, window_start
from node.model.engine import Engine
checkpoint.LAND_AFTER_S = 3600.0  # no restore follows: the pulled context stays in memory
engine = Engine.load(sys.argv[1], progress=lambda m: None, cache_root=sys.argv[2])
store = CheckpointStore(Path(sys.argv[3]), engine.info.fingerprint)
store.open_for_serving()
tier = RemoteTier(store, ObjectStore(sys.argv[4]), window_start=window_start(engine.make_caches()))
print(tier.pull("theta").tokens, flush=True)
threading.Event().wait()
"""


def _pull_in_a_process_then_kill(gguf, model_cache, root: Path, bucket: str) -> int:
    """Tokens a node process pulled (held in memory) before it was SIGKILLed."""
    process = subprocess.Popen(
        [sys.executable, "-c", PULL_THEN_HANG, str(gguf), str(model_cache), str(root), bucket],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    try:
        return int(process.stdout.readline())
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


async def test_a_node_killed_before_a_pulled_context_is_on_disk_pulls_it_again(
    tiny_gguf, model_cache, tiny_engine, tmp_path, bucket
):
    history = await _uploaded_context(tiny_engine, tmp_path / "one", bucket, "theta")
    root = tmp_path / "two"
    assert _pull_in_a_process_then_kill(tiny_gguf, model_cache, root, bucket) == len(history)
    # nothing names the blocks that were only in memory: no manifest, no block files
    assert not list(root.rglob("*.json")) and not list((root / "blocks").rglob("*.safetensors*"))
    store, tier = _pulling_store(tiny_engine, root, bucket)
    try:
        assert store.manifest("theta") is None
        assert tier.pull("theta").tokens == len(history)
        assert store.restore("theta", tiny_engine.make_caches).tokens == history
    finally:
        tier.close()
        store.close()
    assert store.manifest_path("theta").exists()  # landed by the close at the latest
    store.verify("theta")


async def test_partial_blocks_outlive_a_restart_and_missing_blocks_are_fetched_again(
    tiny_engine, tmp_path, bucket
):
    history = await _uploaded_context(tiny_engine, tmp_path / "one", bucket, "eta")
    store, tier = _pulling_store(tiny_engine, tmp_path / "two", bucket)
    tier.pull("eta")
    tier.partial._deferred.clear()  # the node stops before it completes the partial blocks
    tier.close()
    store.close()
    partial = sorted((tmp_path / "two" / "blocks").glob("*/*.partial"))
    assert partial

    two = await _node(tiny_engine, tmp_path / "two", bucket)  # restarts: completes them
    result = await two.generate("eta", history + tiny_engine.encode(" and then", add_bos=False), GREEDY)
    _wait(lambda: not any(path.exists() for path in partial))
    status = two.remote.status()
    await two.close()
    assert result.usage.cached_tokens == len(history)
    assert status["completed_blocks"] == len(partial) and status["downloaded_blocks"] == 0
    CheckpointStore(tmp_path / "two", tiny_engine.info.fingerprint).verify("eta")

    first = min((tmp_path / "two" / "blocks").glob("*/*.safetensors"))
    first.unlink()  # a block lost from the disk
    three = await _node(tiny_engine, tmp_path / "two", bucket)
    history = await three.tokens("eta")
    again = await three.generate("eta", history + tiny_engine.encode(" again", add_bos=False), GREEDY)
    status = three.remote.status()
    await three.close()
    assert again.usage.cached_tokens == len(history)  # the pull brought what was missing back
    assert status["downloaded_blocks"] >= 1


async def test_a_context_stored_whole_by_an_older_node_is_pulled_whole_and_stored_apart_again(
    tiny_engine, tmp_path, weed, bucket
):
    history = await _uploaded_context(tiny_engine, tmp_path / "one", bucket, "theta")
    remote, client = ObjectStore(bucket), s3_client(weed.endpoint)
    latest = remote.latest_manifest("theta")
    for ref in latest["blocks"]:  # the layout before heads and rests were apart
        key = ref["key"]
        body = (tmp_path / "one" / "blocks" / key[:2] / f"{key}.safetensors").read_bytes()
        client.put_object(Bucket="agents", Key=remote.block_key(key), Body=body)
        for part in ("head", "rest"):
            client.delete_object(Bucket="agents", Key=remote.block_key(key, part))
    older = [{k: v for k, v in ref.items() if k != "split"} for ref in latest["blocks"]]
    assert remote.put_manifest("theta", latest["version"] + 1, {**latest, "blocks": older})

    two = await _node(tiny_engine, tmp_path / "two", bucket)
    result = await two.generate("theta", history + tiny_engine.encode(" and then", add_bos=False), GREEDY)
    pulled = two.remote.status()["last_pull"]
    await two.close()
    assert result.usage.cached_tokens == len(history) and pulled["tokens"] == len(history)
    assert pulled["bytes_downloaded"] == sum(client.head_object(
        Bucket="agents", Key=remote.block_key(ref["key"]))["ContentLength"] for ref in older
    )  # fmt: skip
    assert not list((tmp_path / "two" / "blocks").glob("*/*.partial"))  # taken whole
    newest = remote.latest_manifest("theta")["blocks"]
    assert all("split" in ref for ref in newest)  # this node's version: heads and rests apart
    for ref in older[:-1]:
        assert remote.has_block(ref["key"], split=True)


async def test_the_rest_of_a_block_comes_from_its_rest_object_or_else_from_a_whole_one(
    tiny_engine, tmp_path, weed, bucket
):
    """A partial block left by a node of the former layout (heads were ranges of whole objects)
    is completed from the whole object."""
    await _uploaded_context(tiny_engine, tmp_path / "one", bucket, "iota")
    remote, client = ObjectStore(bucket), s3_client(weed.endpoint)
    ref = remote.latest_manifest("iota")["blocks"][0]
    key, head = ref["key"], ref["split"]
    body = (tmp_path / "one" / "blocks" / key[:2] / f"{key}.safetensors").read_bytes()
    for layout in ("apart", "whole"):
        if layout == "whole":
            client.put_object(Bucket="agents", Key=remote.block_key(key), Body=body)
            for part in ("head", "rest"):
                client.delete_object(Bucket="agents", Key=remote.block_key(key, part))
        target = tmp_path / f"{layout}.partial"
        target.write_bytes(body[:head])
        assert remote.get_rest(key, target) == len(body) - head
        assert target.read_bytes() == body
    remote.delete_block(key)
    assert remote.get_rest(key, target) is None and not remote.has_block(key)

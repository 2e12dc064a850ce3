"""The parallel device restore gives exactly what the store's own restore gives (on the CPU here)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from node.bench import synthetic
from node.errors import CheckpointCorrupt
from node.memory import device_restore
from node.memory.checkpoint import CheckpointStore
from node.model import kv_cache


@pytest.fixture(scope="module")
def filled():
    """A six-layer random model (one global layer, five with a 32-token window) and its caches
    after 699 tokens (three blocks, the last one partial)."""
    model = synthetic.build("tiny", dtype=mx.float32)
    caches = kv_cache.make_caches(model)
    tokens = [t % 500 for t in range(1, 700)]
    for start in range(0, len(tokens), 100):
        model(mx.array(tokens[start : start + 100])[None], cache=caches)
    mx.eval([c.keys for c in caches] + [c.values for c in caches])
    return model, caches, tokens


def _same(reference, restored) -> None:
    assert restored.tokens == reference.tokens and restored.metadata == reference.metadata
    assert restored.blocks == reference.blocks
    for a, b in zip(reference.caches, restored.caches, strict=True):
        assert (a.offset, a.base) == (b.offset, b.base)
        assert mx.array_equal(a.keys, b.keys).item() and mx.array_equal(a.values, b.values).item()


@pytest.mark.parametrize("storage", ["float16", "bfloat16", "int8"])
@pytest.mark.parametrize("landing", ["copy", "staging"])
@pytest.mark.parametrize("stop", [None, 77, 260, 600])
def test_device_restore_matches_the_store(filled, tmp_path, storage, landing, stop):
    model, caches, tokens = filled
    store = CheckpointStore(tmp_path, "fp", storage=storage)
    store.save("a", tokens[:300], caches, 0, {"turn": 1})
    store.save("a", tokens, caches, 300, {"turn": 2})  # a block grown across two saves
    position = None if stop is None else (lambda saved: stop)
    reference = store.restore("a", lambda: kv_cache.make_caches(model), position)
    restored = device_restore.restore(
        store, "a", lambda: kv_cache.make_caches(model), mx.float32, position, landing=landing
    )
    _same(reference, restored)
    assert restored.phases.bytes_read > 0


def test_sliding_layers_read_only_their_window(filled, tmp_path):
    model, caches, tokens = filled
    store = CheckpointStore(tmp_path, "fp")
    store.save("a", tokens, caches, 0, {})
    plan = device_restore.plan_restore(store, "a", kv_cache.make_caches(model))
    rows = [keys.shape[0] for keys, _ in plan.layers]
    assert rows == [31, 31, 31, 31, 31, 699]
    # the window's 31 rows lie in the last block: one read each, not three
    assert [len(keys.reads) for keys, _ in plan.layers] == [1, 1, 1, 1, 1, 3]


def test_staging_is_reused_without_aliasing_earlier_restores(filled, tmp_path):
    model, caches, tokens = filled
    store = CheckpointStore(tmp_path, "fp", storage="float16")
    store.save("a", tokens, caches, 0, {})
    reference = store.restore("a", lambda: kv_cache.make_caches(model))
    first = device_restore.restore(
        store, "a", lambda: kv_cache.make_caches(model), mx.float32, landing="staging"
    )
    device_restore.restore(
        store, "a", lambda: kv_cache.make_caches(model), mx.float32, lambda t: 100, landing="staging"
    )
    _same(reference, first)


def test_a_damaged_tensor_is_refused(filled, tmp_path):
    model, caches, tokens = filled
    store = CheckpointStore(tmp_path, "fp")
    store.save("a", tokens, caches, 0, {})
    plan = device_restore.plan_restore(store, "a", kv_cache.make_caches(model))
    read = plan.layers[-1][0].reads[0]
    with open(read.path, "r+b") as handle:
        handle.seek(read.offset + 5)
        byte = handle.read(1)
        handle.seek(read.offset + 5)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointCorrupt):
        device_restore.restore(store, "a", lambda: kv_cache.make_caches(model), mx.float32)


def test_restore_path_matches_the_store(filled, tmp_path):
    model, caches, tokens = filled
    store = CheckpointStore(tmp_path, "fp")
    store.save("a", tokens, caches, 0, {})
    path = store.path("a")
    reference = store.restore_path(path, lambda: kv_cache.make_caches(model), lambda t: 400)
    restored = device_restore.restore_path(
        store, path, lambda: kv_cache.make_caches(model), mx.float32, lambda t: 400, landing="staging"
    )
    _same(reference, restored)
    assert len(restored.blocks) == 2

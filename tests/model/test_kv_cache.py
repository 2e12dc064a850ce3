"""`SlidingHistoryCache` against a `FullHistoryCache` (mlx-lm's KVCache) fed the same positions: what a
sliding layer attends to must be the full cache's last window, before and after the history
outgrows the window, after rewinds, after `compact`, and after a round trip through
`positions`/`install` (the checkpoint's path)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.base import create_causal_mask

from node.model import kv_cache
from node.model.kv_cache import FullHistoryCache, SlidingHistoryCache

WINDOW = 8
HEADS, DIM = 2, 4


def chunk(start: int, n: int, salt: int = 0) -> tuple[mx.array, mx.array]:
    """Keys and values for positions [start, start + n); `salt` gives a different continuation."""
    rng = np.random.default_rng([start, n, salt])
    keys = rng.standard_normal((1, HEADS, n, DIM)).astype(np.float32)
    values = rng.standard_normal((1, HEADS, n, DIM)).astype(np.float32)
    return mx.array(keys), mx.array(values)


class Pair:
    """A sliding cache and a full cache, fed and rewound together."""

    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self.sliding, self.full = SlidingHistoryCache(window), FullHistoryCache()

    def append(self, n: int, salt: int = 0, *, compact: bool = False) -> None:
        """Feed n positions to both; what the sliding cache returns is the full one's last window."""
        start = self.full.offset
        keys, values = chunk(start, n, salt)
        mask = self.sliding.make_mask(n)
        got_k, got_v = self.sliding.update_and_fetch(keys, values)
        full_k, full_v = self.full.update_and_fetch(keys, values)
        visible = max(0, start - (self.window - 1))
        assert self.sliding.offset == self.full.offset == start + n
        np.testing.assert_array_equal(np.array(got_k), np.array(full_k[..., visible:, :]))
        np.testing.assert_array_equal(np.array(got_v), np.array(full_v[..., visible:, :]))
        # Attention over the returned window with the cache's mask equals windowed attention
        # over the full history.
        queries = mx.array(np.random.default_rng([start, n, salt, 1]).standard_normal((1, HEADS, n, DIM)))
        queries = queries.astype(mx.float32)
        full_mask = create_causal_mask(n, start, window_size=self.window)
        ours = mx.fast.scaled_dot_product_attention(queries, got_k, got_v, scale=1.0, mask=mask)
        reference = mx.fast.scaled_dot_product_attention(queries, full_k, full_v, scale=1.0, mask=full_mask)
        np.testing.assert_allclose(np.array(ours), np.array(reference), atol=1e-5)
        if compact:
            self.sliding.compact()

    def rewind_to(self, position: int) -> None:
        assert self.sliding.can_trim_to(position)
        n = self.sliding.offset - position
        assert self.sliding.trim(n) == n and self.full.trim(n) == n
        assert self.sliding.offset == self.full.offset == position


def test_appends_within_the_window_return_everything():
    pair = Pair()
    for n in (1, 3, 2, 1):  # 7 positions: all still visible
        pair.append(n)
    assert pair.sliding.base == 0


@pytest.mark.parametrize("sizes", [[1] * 30, [3, 5, 1, 9, 2, 1, 12], [40], [5, 300, 1, 1]])
def test_appends_past_the_window_return_the_last_window(sizes):
    pair = Pair()
    for n in sizes:  # single tokens, chunks smaller and larger than the window, buffer growth
        pair.append(n)
    assert pair.sliding.offset == sum(sizes) > WINDOW


def test_compacting_keeps_only_the_window_and_the_same_answers():
    pair = Pair()
    for n in [3, 5, 1, 9, 2, 1, 12, 1, 1, 1, 7]:
        pair.append(n, compact=True)
        offset = pair.sliding.offset
        assert pair.sliding.base == max(0, offset - (WINDOW - 1))
        if pair.sliding.base > 0:  # nothing forgotten yet: the buffer keeps its spare room
            assert pair.sliding.keys.shape[2] == offset - pair.sliding.base == WINDOW - 1
        assert pair.sliding.nbytes == pair.sliding.keys.nbytes + pair.sliding.values.nbytes


def test_rewind_before_the_history_outgrows_the_window():
    pair = Pair()
    pair.append(6)
    pair.rewind_to(2)
    pair.append(3, salt=1)  # a different continuation overwrites positions 2..4
    pair.rewind_to(0)
    pair.append(7, salt=2)


def test_rewind_far_behind_the_window_without_compacting():
    """mlx-lm's RotatingKVCache cannot do this once wrapped (mlx-lm issue 980)."""
    pair = Pair()
    for n in (10, 1, 1, 25):
        pair.append(n)
    assert all(pair.sliding.can_trim_to(p) for p in range(pair.sliding.offset + 1))
    pair.rewind_to(4)  # 33 positions back, far behind the window
    for n in (1, 6, 9):
        pair.append(n, salt=1)
    pair.rewind_to(pair.sliding.offset - 3)
    pair.append(2, salt=2)


def test_rewind_after_compacting_only_within_the_history_in_memory():
    pair = Pair()
    pair.append(12, compact=True)  # positions 0..4 forgotten
    pair.append(9)  # 21 positions, 5..20 in memory
    sliding = pair.sliding
    assert (sliding.offset, sliding.base) == (21, 5)
    # Continuing after `position` needs positions from position - (WINDOW - 1) on.
    reachable = [p for p in range(sliding.offset + 1) if sliding.can_trim_to(p)]
    assert reachable == list(range(5 + WINDOW - 1, 22))
    with pytest.raises(ValueError, match="cannot rewind"):
        sliding.trim(21 - (reachable[0] - 1))
    assert (sliding.offset, sliding.base) == (21, 5)  # a refused rewind changes nothing
    pair.rewind_to(reachable[0])
    pair.append(1, salt=1)
    pair.append(5, salt=1)
    pair.sliding.compact()
    # Right after compacting, only the current position can be continued from memory.
    assert [p for p in range(pair.sliding.offset + 1) if pair.sliding.can_trim_to(p)] == [18]


def test_module_helpers_trim_and_compact_lists_of_caches():
    caches = [SlidingHistoryCache(WINDOW), FullHistoryCache()]
    for cache in caches:
        cache.update_and_fetch(*chunk(0, 20))
    assert kv_cache.can_trim_to(caches, 3)
    kv_cache.trim_to(caches, 15)
    assert [c.offset for c in caches] == [15, 15]
    kv_cache.compact(caches)
    assert caches[0].base == 15 - (WINDOW - 1) and caches[1].base == 0
    assert kv_cache.can_trim_to(caches, 15) and not kv_cache.can_trim_to(caches, 14)
    assert caches[0].history_start(15) == 15 - (WINDOW - 1)
    assert caches[1].history_start(15) == 0
    assert kv_cache.nbytes(caches) == sum(c.nbytes for c in caches)


@pytest.mark.parametrize("compacted", [False, True])
def test_state_round_trip_through_positions_and_install(compacted):
    """What a checkpoint saves (`positions` from `history_start`) and restores (`install`) into a
    fresh cache continues exactly like the original."""
    pair = Pair()
    for n in (11, 1, 9):
        pair.append(n, compact=compacted)
    original = pair.sliding
    first = original.history_start(original.offset)
    keys, values = kv_cache.positions(original, first, original.offset)
    assert keys.shape[2] == original.offset - first == WINDOW - 1
    restored = SlidingHistoryCache(WINDOW)
    restored.install(keys, values, first)
    assert (restored.offset, restored.base) == (original.offset, first)
    positions = range(original.offset + 1)
    assert [p for p in positions if restored.can_trim_to(p)] == [original.offset]
    if compacted:  # the original holds no more than the restored copy
        assert [p for p in positions if original.can_trim_to(p)] == [original.offset]
    pair.sliding = restored  # the restored cache must go on like the full cache
    for n in (1, 4, 1):
        pair.append(n)
    pair.rewind_to(pair.sliding.offset - 2)
    pair.append(3, salt=1)


def test_positions_refuse_what_is_no_longer_in_memory():
    cache = SlidingHistoryCache(WINDOW)
    cache.update_and_fetch(*chunk(0, 20))
    cache.compact()
    with pytest.raises(ValueError, match="no longer in memory"):
        kv_cache.positions(cache, cache.base - 1, cache.offset)
    with pytest.raises(ValueError, match="full-history cache must start at position 0"):
        FullHistoryCache().install(*chunk(5, 3), base=5)


def test_empty_cache():
    cache = SlidingHistoryCache(WINDOW)
    assert cache.nbytes == 0 and cache.offset == 0 and cache.can_trim_to(0)
    cache.compact()  # nothing to forget
    assert cache.keys is None and cache.base == 0

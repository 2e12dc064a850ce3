"""KV caches that can be rewound anywhere, also for sliding-window layers.

mlx-lm gives Gemma 3's sliding layers a `RotatingKVCache`, which cannot be trimmed once it has
wrapped (mlx-lm issue 980): a conversation that diverges past the window loses prefix reuse.
`SlidingHistoryCache` instead keeps every position since `base` in order and hands attention only
the last `window` of them, so trimming is exact. Positions older than the window are dropped from
memory once they are checkpointed (`compact`); a rewind further back is served from the checkpoint
on disk, which keeps the full history.

Both cache classes here store positions `[base, offset)` and share one protocol on top of mlx-lm's
(`update_and_fetch`, `trim`, `nbytes`): `append(keys, values)` (a write that returns the buffer
range attention reads, not views of it), `room()` and `advance(n)` (for a native operation that
writes a decode step's keys and values into the buffers itself), `can_trim_to(position)`, `compact()`,
`history_start(offset)` (the first position attention still needs), `visible_after_update()` and
`install(keys, values, base)`. Global layers use `FullHistoryCache` (base always 0).
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache


class _GrowingBuffer:
    """Positions [base, offset) at the front of a buffer that grows `step` positions at a time
    (mlx-lm's KVCache layout), written without fetching: `append` returns the buffer range
    attention reads instead of views of it (a batched decode step would build and drop two views
    per agent and layer)."""

    def append(self, keys: mx.array, values: mx.array) -> tuple[int, int]:
        """Write positions [offset, offset + n); returns the buffer positions [start, stop) that
        attention reads for them."""
        n = keys.shape[2]
        if self.room() < n:
            self._grow(keys, values, self.offset - self.base, n)
        used, positions = self.advance(n)
        self.keys[:, :, used : used + n] = keys  # (cheaper to build than [..., a:b, :])
        self.values[:, :, used : used + n] = values
        return positions

    def room(self) -> int:
        """How many more positions the buffers hold without growing."""
        return 0 if self.keys is None else self.keys.shape[2] - (self.offset - self.base)

    def advance(self, n: int) -> tuple[int, tuple[int, int]]:
        """Count positions [offset, offset + n) as written (for a kernel that writes them into the
        buffers itself; needs `room`): the buffer index they go to, and the buffer positions
        [start, stop) that attention reads for them."""
        used = self.offset - self.base
        start = self.history_start(self.offset) - self.base
        self.offset += n
        return used, (start, used + n)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        start, stop = self.append(keys, values)
        return self.keys[..., start:stop, :], self.values[..., start:stop, :]

    def _grow(self, keys: mx.array, values: mx.array, used: int, n: int) -> None:
        steps = (self.step + n - 1) // self.step
        shape = (*keys.shape[:2], steps * self.step)
        new_k = mx.zeros((*shape, keys.shape[3]), keys.dtype)
        new_v = mx.zeros((*shape, values.shape[3]), values.dtype)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
        else:
            self.keys = mx.concatenate([self.keys[..., :used, :], new_k], axis=2)
            self.values = mx.concatenate([self.values[..., :used, :], new_v], axis=2)


class FullHistoryCache(_GrowingBuffer, KVCache):
    """mlx-lm's `KVCache` (every position since 0) with the node's cache protocol."""

    base = 0

    def can_trim_to(self, position: int) -> bool:
        return True

    def compact(self) -> None:
        """Nothing to forget: attention sees every position."""

    def history_start(self, offset: int) -> int:
        return 0

    def visible_after_update(self) -> int:
        """How many keys attention sees once one more token is added."""
        return self.offset + 1

    def install(self, keys: mx.array, values: mx.array, base: int) -> None:
        """Fill a fresh cache with positions [base, base + keys.shape[2])."""
        if base != 0:
            raise ValueError("a full-history cache must start at position 0")
        self.keys, self.values, self.offset = keys, values, keys.shape[2]


class SlidingHistoryCache(_GrowingBuffer, KVCache):
    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window
        self.base = 0

    def _visible_start(self, offset: int) -> int:
        return max(0, offset - (self.window - 1))

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        if N == 1:
            return None
        mask = create_causal_mask(N, self.offset, window_size=self.window)
        return mask[:, self._visible_start(self.offset) :]

    def can_trim_to(self, position: int) -> bool:
        return self.base == 0 or self._visible_start(position) >= self.base

    def history_start(self, offset: int) -> int:
        return self._visible_start(offset)

    def visible_after_update(self) -> int:
        return min(self.offset + 1, self.window)

    def install(self, keys: mx.array, values: mx.array, base: int) -> None:
        self.keys, self.values, self.base, self.offset = keys, values, base, base + keys.shape[2]

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        if not self.can_trim_to(self.offset - n):
            raise ValueError("cannot rewind a sliding cache past the history it holds in memory")
        self.offset -= n
        return n

    def compact(self) -> None:
        """Forget positions that attention can no longer see (call once they are on disk)."""
        start = self._visible_start(self.offset)
        if self.keys is None or start <= self.base:
            return
        kept = slice(start - self.base, self.offset - self.base)
        self.keys = mx.contiguous(self.keys[..., kept, :])
        self.values = mx.contiguous(self.values[..., kept, :])
        self.base = start

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


LayerCache = FullHistoryCache | SlidingHistoryCache


def update_in_place(
    cache: LayerCache, keys: mx.array, values: mx.array
) -> tuple[mx.array, mx.array, tuple[int, int]]:
    """Write a step's keys and values into `cache`; return its buffers and the positions [start,
    stop) of them that attention reads, for a kernel that takes a range (no slice operations)."""
    positions = cache.append(keys, values)
    return cache.keys, cache.values, positions


def make_caches(model) -> list[LayerCache]:
    """One rewindable cache per layer, mirroring the model's own choice of cache type."""
    native = model.make_cache() if hasattr(model, "make_cache") else [KVCache() for _ in model.layers]
    caches: list[LayerCache] = []
    for cache in native:
        if isinstance(cache, RotatingKVCache):
            caches.append(SlidingHistoryCache(cache.max_size))
        elif type(cache) is KVCache:
            caches.append(FullHistoryCache())
        else:
            raise TypeError(f"unsupported layer cache {type(cache).__name__}")
    return caches


def can_trim_to(caches: list[LayerCache], position: int) -> bool:
    return all(c.can_trim_to(position) for c in caches)


def trim_to(caches: list[LayerCache], position: int) -> None:
    for cache in caches:
        if cache.offset > position:
            cache.trim(cache.offset - position)


def compact(caches: list[LayerCache]) -> None:
    for cache in caches:
        cache.compact()


def positions(cache: LayerCache, start: int, stop: int) -> tuple[mx.array, mx.array]:
    """Keys and values of absolute positions [start, stop) of one layer."""
    span = buffer_span(cache, start, stop)
    return cache.keys[..., span, :], cache.values[..., span, :]


def buffer_span(cache: LayerCache, start: int, stop: int) -> slice:
    """Where absolute positions [start, stop) of one layer lie in its `keys` and `values` buffers."""
    base = cache.base
    if start < base:
        raise ValueError(f"positions before {base} are no longer in memory")
    return slice(start - base, stop - base)


def prefix_views(caches: list[LayerCache], position: int, fresh: list[LayerCache]) -> list[LayerCache] | None:
    """`fresh` caches holding the first `position` positions of `caches` as views of their arrays
    (no copy; every later write copies), or None where `caches` no longer hold what is needed."""
    for source, target in zip(caches, fresh):
        start = target.history_start(position)
        if source.keys is None or source.base > start or source.offset < position:
            return None
        span = slice(start - source.base, position - source.base)
        target.install(source.keys[..., span, :], source.values[..., span, :], start)
    return fresh


def resident_positions(cache: LayerCache, tokens: int) -> int:
    """How many positions a layer cache keeps in memory for a context of `tokens` positions."""
    if isinstance(cache, SlidingHistoryCache):
        return min(tokens, cache.window + cache.step)
    return tokens


def nbytes(caches: list[LayerCache]) -> int:
    return sum(cache.nbytes for cache in caches)

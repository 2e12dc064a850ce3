"""Faster stand-ins for MLX CPU kernels that are slow on x86.

On Linux the mlx-cpu wheel evaluates transcendental functions one element at a time: on the
2-core CI machine `mx.tanh` takes ~46 ns and `mx.exp` ~28 ns per float, while a multiply takes
~1 ns. Prefilling 512 tokens of Gemma 3 270M spent ~40% of its time in `gelu_approx` (tanh,
pow), ~20% in the softmax of `mx.fast.scaled_dot_product_attention` (exp) and ~8% in
`mx.fast.rope` (sin, cos).

Here the same functions are written as short polynomials and rationals of multiplies and adds,
which `mx.compile` fuses into generated kernels:
- `tanh`: Eigen's rational approximation (|error| < 4e-7 over all floats);
- `exp` of non-positive arguments (softmax after subtracting the row maximum): Cephes' expf
  (relative error < 1e-7), with the power of two built from the exponent bits;
- attention with that softmax (grouped query heads share one matmul), by blocks of queries,
  where causality lets the blocks skip at least a quarter of the keys (elsewhere MLX's own);
- RoPE from cos/sin tables computed once per chunk in float64 (a decode step's natively);
- RMS norms as one native operation each (`native/norm_rope.cpp`; MLX expands them into ~8);
- a Gemma 3 layer's decode step as four native operations plus its cache writes (~22 MLX
  operations otherwise): q/k/v with their norms and RoPE (`native/attention_inputs.cpp`), the
  attention, its output projection with norm and residual, the MLP with its norms and residual
  (`native/decode_blocks.cpp`); a batch of agents attends per agent;
- greedy decoding's argmax over the logits, split over the pool (`native/argmax.cpp`);
- decode steps' attention (one query) by node's native kernel (`native/decode_attention.cpp`): one
  pass over K and V, split over the positions, instead of six MLX operations whose products go
  through sgemm.

`install(model)` routes a loaded mlx-lm model through them on the CPU backend only: its gated
MLPs (Gemma's GELU, Llama's SwiGLU), its `nn.RoPE` layers and the attention function of its
model modules; Gemma 3's attention and decoder layers are replaced per instance for decode steps.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import mlx.core as mx
import numpy as np
from mlx import nn

from node.model import blas, cpu_extension, int8_weights, kv_cache
from node.model.kv_cache import FullHistoryCache, SlidingHistoryCache

# Eigen's generic_fast_tanh_float: tanh(x) = x * P(x^2) / Q(x^2) on [-7.9053, 7.9053].
_TANH_CLAMP = 7.90531110763549805
_TANH_P = (
    -2.76076847742355e-16,
    2.00018790482477e-13,
    -8.60467152213735e-11,
    5.12229709037114e-08,
    1.48572235717979e-05,
    6.37261928875436e-04,
    4.89352455891786e-03,
)
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)

# Cephes expf: exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 split in two parts.
_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_EXP_P = (
    1.9875691500e-4,
    1.3981999507e-3,
    8.3334519073e-3,
    4.1665795894e-2,
    1.6666665459e-1,
    5.0000001201e-1,
)
_ROUNDING = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds a float32 to an integer
_EXP_MIN = -87.0  # exp(-87) ~ 1.6e-38, near the smallest normal float32

_GELU_C = math.sqrt(2 / math.pi)
QUERY_BLOCK = 128
_MASKED = -3.4028234e38  # finite, so that a fully masked row gives uniform weights, not NaN


def _polynomial(x: mx.array, coefficients: tuple[float, ...]) -> mx.array:
    result = coefficients[0]
    for c in coefficients[1:]:
        result = result * x + c
    return result


@mx.compile
def tanh(x: mx.array) -> mx.array:
    x = mx.clip(x, -_TANH_CLAMP, _TANH_CLAMP)
    x2 = x * x
    return x * _polynomial(x2, _TANH_P) / _polynomial(x2, _TANH_Q)


@mx.compile
def exp_nonpositive(x: mx.array) -> mx.array:
    """exp(x) for x <= 0, flushed to 0 below -87 (subnormal results would slow BLAS ~50x later)."""
    clamped = mx.maximum(x, _EXP_MIN)
    n = (clamped * _LOG2E + _ROUNDING) - _ROUNDING
    r = clamped - n * _LN2_HI - n * _LN2_LO
    e = _polynomial(r, _EXP_P) * (r * r) + r + 1.0
    return mx.where(x > _EXP_MIN, e * mx.left_shift(n.astype(mx.int32) + 127, 23).view(mx.float32), 0.0)


@mx.compile
def gelu_approx_gate(gate: mx.array, up: mx.array) -> mx.array:
    """`nn.gelu_approx(gate) * up`, as in Gemma's MLP."""
    return 0.5 * gate * (1.0 + tanh(_GELU_C * (gate + 0.044715 * gate * gate * gate))) * up


@mx.compile
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """`silu(gate) * up`, as in Llama's MLP (sigmoid(x) = (1 + tanh(x / 2)) / 2)."""
    return gate * (0.5 + 0.5 * tanh(0.5 * gate)) * up


@mx.compile
def _softmax(scores: mx.array) -> mx.array:
    e = exp_nonpositive(scores - mx.max(scores, axis=-1, keepdims=True))
    return e / mx.sum(e, axis=-1, keepdims=True)


def _causal(queries: int, keys: int) -> mx.array:
    return mx.arange(queries)[:, None] + (keys - queries) >= mx.arange(keys)[None]


def attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask=None) -> mx.array:
    """softmax(q k^T * scale + mask) v for (B, heads, L, D) queries and (B, kv_heads, S, D) keys."""
    b, heads, length, dim = queries.shape
    kv_heads, kv_length = keys.shape[1], keys.shape[2]
    grouped = (queries * scale).reshape(b, kv_heads, heads // kv_heads * length, dim)
    scores = (grouped @ keys.swapaxes(-1, -2)).reshape(b, heads, length, kv_length)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown attention mask {mask!r}")
        mask = _causal(length, kv_length)
    if mask is None:
        weights = _softmax(scores)
    elif mask.dtype == mx.bool_:
        weights = _softmax(mx.where(mask, scores, _MASKED))
    else:
        weights = _softmax(scores + mask)
    grouped = weights.reshape(b, kv_heads, heads // kv_heads * length, kv_length) @ values
    return grouped.reshape(b, heads, length, values.shape[-1])


def _visibility(first_query: int, queries: int, first_key: int, keys: int, window: int | None) -> mx.array:
    q = mx.arange(first_query, first_query + queries)[:, None]
    k = mx.arange(first_key, first_key + keys)[None]
    return (k <= q) if window is None else (k <= q) & (k > q - window)


def _query_blocks(
    length: int, kv_length: int, first_key: int, window: int | None
) -> list[tuple[int, int, int, int]]:
    """(query start, query stop, first key, key stop) per block of QUERY_BLOCK queries, positions absolute."""
    first_query = first_key + kv_length - length
    blocks = []
    for start in range(0, length, QUERY_BLOCK):
        stop = min(length, start + QUERY_BLOCK)
        lo = first_key if window is None else max(first_key, first_query + start - window + 1)
        blocks.append((first_query + start, first_query + stop, lo, first_query + stop))
    return blocks


def blocked_causal_attention(
    queries: mx.array, keys: mx.array, values: mx.array, scale: float, first_key: int, window: int | None
) -> mx.array:
    """Causal (optionally sliding-window) attention of the last L of S positions, by query blocks.

    Keys hold positions [first_key, first_key + S) and queries the last L of them; each block of
    QUERY_BLOCK queries scores only the keys it can see.
    """
    blocks = _query_blocks(queries.shape[2], keys.shape[2], first_key, window)
    outputs = []
    offset = blocks[0][0]
    for q_start, q_stop, k_start, k_stop in blocks:
        span = slice(k_start - first_key, k_stop - first_key)
        mask = _visibility(q_start, q_stop - q_start, k_start, k_stop - k_start, window)
        rows = slice(q_start - offset, q_stop - offset)
        outputs.append(attention(queries[:, :, rows], keys[:, :, span], values[:, :, span], scale, mask))
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=2)


def _blocks_pay_off(length: int, kv_length: int, first_key: int, window: int | None) -> bool:
    """Whether query blocks skip at least a quarter of the scores (a 512-token chunk at the start,
    any chunk of a sliding-window layer). Otherwise MLX's own attention is as fast or faster: our
    softmax makes several passes over the scores, which costs once they outgrow the caches."""
    blocks = _query_blocks(length, kv_length, first_key, window)
    scored = sum((q_stop - q_start) * (k_stop - k_start) for q_start, q_stop, k_start, k_stop in blocks)
    return scored <= 0.75 * length * kv_length


def _causal_layout(cache, queries: int, keys: int, mask) -> tuple[int, int | None] | None:
    """(first key position, window) when `mask` is just `cache`'s causal mask, else None."""
    if isinstance(cache, FullHistoryCache) and isinstance(mask, str) and mask == "causal":
        return cache.offset - keys, None
    if (
        isinstance(cache, SlidingHistoryCache)
        and isinstance(mask, mx.array)
        and mask.shape == (queries, keys)
    ):
        return cache.offset - keys, cache.window
    return None


# True while a model that `install` was called on builds its graph: the attention replacement
# lives in the architecture's module (shared by every model of that architecture in the process),
# so it falls back to MLX's kernels for models the fast paths were not installed on.
_installed_model_running: ContextVar[bool] = ContextVar("installed_model_running", default=False)


def _decode_mask(mask, batch: int, keys: int):
    """`mask` as decode_attention takes it: None, or a (B, 1, 1, S) bool visibility; False when the
    native kernel cannot take it."""
    if mask is None:
        return None
    if (
        isinstance(mask, mx.array)
        and mask.dtype == mx.bool_
        and mask.shape in ((batch, 1, 1, keys), (1, 1, 1, keys))
    ):
        return mx.broadcast_to(mask, (batch, 1, 1, keys)) if mask.shape[0] != batch else mask
    return False


def _native_decode(queries, keys, values, cache, scale, mask, sinks):
    """One-query attention by node's native kernel, or None where it does not apply."""
    if queries.shape[2] != 1 or sinks is not None or hasattr(cache, "bits"):
        return None
    if not (queries.dtype == keys.dtype == values.dtype == mx.float32) or keys.shape != values.shape:
        return None
    visible = _decode_mask(mask, queries.shape[0], keys.shape[2])
    ops = cpu_extension.extension() if visible is not False else None
    if ops is None:
        return None
    return ops.decode_attention(queries, keys, values, float(scale), visible)


def _fast_sdpa(fallback):
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if not _installed_model_running.get():
            return fallback(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
        decoded = _native_decode(queries, keys, values, cache, scale, mask, sinks)
        if decoded is not None:
            return decoded
        layout = None
        if queries.shape[2] > 1 and sinks is None and not hasattr(cache, "bits"):
            layout = _causal_layout(cache, queries.shape[2], keys.shape[2], mask)
        if layout is None or not _blocks_pay_off(queries.shape[2], keys.shape[2], *layout):
            return fallback(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
        return blocked_causal_attention(queries, keys, values, scale, *layout)

    scaled_dot_product_attention.fallback = fallback
    return scaled_dot_product_attention


def _gated_mlp(gate_activation):
    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(gate_activation(self.gate_proj(x), self.up_proj(x)))

    return __call__


@functools.lru_cache(maxsize=16)
def rope_table(dims: int, base: float, scale: float, offset: int, length: int) -> tuple[mx.array, mx.array]:
    """cos and sin of positions [offset, offset + length) x RoPE frequencies, computed in float64.

    One table serves every layer with the same base in a forward pass (MLX's rope recomputes
    them per element with its slow sin/cos), and float64 angles are exact where float32 ones
    drift by ~1e-3 rad at position 8k.
    """
    inv_freq = base ** (-np.arange(0, dims, 2, dtype=np.float64) / dims)
    angles = (np.arange(offset, offset + length, dtype=np.float64) * scale)[:, None] * inv_freq[None]
    return mx.array(np.cos(angles).astype(np.float32)), mx.array(np.sin(angles).astype(np.float32))


@mx.compile
def _rotate(x1: mx.array, x2: mx.array, cos: mx.array, sin: mx.array) -> tuple[mx.array, mx.array]:
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


def _positions(offset) -> mx.array:
    """A cache's offset (an int, or one per sequence for a batch) as the native RoPE takes it."""
    return offset if isinstance(offset, mx.array) else mx.array([offset], mx.int32)


def _native_rope(self, x: mx.array, offset) -> mx.array | None:
    """A decode step's rotation as one native operation (MLX's CPU RoPE expands into ~15), or None."""
    ops = cpu_extension.extension()
    if ops is None or self.traditional or x.ndim != 4 or x.dtype != mx.float32:
        return None
    return ops.rope(x, self.dims, float(self.base), float(self.scale), _positions(offset))


def _table_rope(self, x: mx.array, offset=0) -> mx.array:
    """`nn.RoPE` (non-traditional) from a cached table for prompt chunks, natively for decode steps."""
    if x.shape[-2] == 1 and (rotated := _native_rope(self, x, offset)) is not None:
        return rotated
    if self.traditional or self.dims != x.shape[-1] or not isinstance(offset, int) or x.shape[-2] == 1:
        return nn.RoPE.__call__(self, x, offset)
    cos, sin = rope_table(self.dims, float(self.base), float(self.scale), offset, x.shape[-2])
    half = self.dims // 2
    return mx.concatenate(_rotate(x[..., :half], x[..., half:], cos, sin), axis=-1)


def argmax(logits: mx.array) -> mx.array:
    """`mx.argmax(logits, axis=-1)` (greedy decoding's token), natively on the CPU backend: MLX's
    walks a 262,144-logit row on one thread, ~0.25 ms per agent per step (`native/argmax.cpp`)."""
    ops = cpu_extension.extension() if mx.default_device() == mx.cpu else None
    if ops is None or logits.dtype != mx.float32:
        return mx.argmax(logits, axis=-1)
    return ops.argmax_rows(logits)


def _native_rms_norm(weight_offset: float):
    """`__call__` of an RMS norm whose scale is `weight_offset + weight`, as one native operation."""

    def __call__(self, x: mx.array) -> mx.array:
        ops = cpu_extension.extension()
        if ops is None or x.dtype != mx.float32:
            return type(self).__mro__[1].__call__(self, x)
        return ops.rms_norm(x, self.weight, self.eps, weight_offset)

    return __call__


# mlx-lm model modules whose `RMSNorm` scales by 1 + weight (Gemma stores weights as w - 1).
OFFSET_RMS_NORMS = {"mlx_lm.models.gemma3_text"}


def _int8(*layers: nn.Module) -> bool:
    return all(isinstance(layer, int8_weights.Int8Linear) for layer in layers)


# A layer's decode arguments (weights, norms, sizes), gathered once per `install`: read through
# nn.Module's `__getattr__` they were ~40 dictionary lookups per layer and step (~0.4 ms of a step's
# graph building). Kept in the instance's own __dict__, outside the parameter tree.
_ARGUMENTS = "_node_decode_arguments"


def _decode_arguments(module: nn.Module, gather):
    """`gather(module)`, computed on the first decode step after `install` and kept until the next
    `install` or `uninstall` (the weights are final by then: the engine quantizes first)."""
    arguments = module.__dict__.get(_ARGUMENTS, _ARGUMENTS)
    if arguments is _ARGUMENTS:
        arguments = gather(module)
        object.__setattr__(module, _ARGUMENTS, arguments)
    return arguments


def _forget_decode_arguments(model: nn.Module) -> None:
    for _, m in model.named_modules():
        m.__dict__.pop(_ARGUMENTS, None)


def _attention_arguments(attention: nn.Module) -> tuple | None:
    """What attention_inputs takes besides x and positions, or None where the layer does not fit it
    (projections not int8, a traditional RoPE)."""
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    rope = attention.rope
    if not (isinstance(rope, nn.RoPE) and not rope.traditional) or not _int8(*projections):
        return None
    weights = [a for p in projections for a in (p.weight, p.scales)]
    return (
        weights, attention.q_norm.weight, attention.k_norm.weight, attention.n_heads, attention.n_kv_heads,
        attention.head_dim, attention.q_norm.eps, rope.dims, float(rope.base), float(rope.scale),
    )  # fmt: skip


def _fused_attention_inputs(
    attention: nn.Module, x: mx.array, cache, ops, split_rows: bool = False, into: list | None = None
) -> tuple | None:
    """A decode step's (q, k, v) as one native operation (int8 projections, Gemma's q/k norms,
    RoPE), or None where this layer does not fit it. `split_rows`: k and v as lists, one array per
    row. `into`: caches, one per row, that k and v go straight into (see `_writable_in_place`);
    returns q and the buffer ranges attention reads then."""
    if x.dtype != mx.float32 or (arguments := _decode_arguments(attention, _attention_arguments)) is None:
        return None
    weights, q_norm, k_norm, heads, kv_heads, head_dim, eps, dims, base, scale = arguments
    positions = _positions(cache.offset)
    if into is None:
        return ops.attention_inputs(
            x, weights, q_norm, k_norm, positions, heads, kv_heads, head_dim, eps, 1.0, dims, base, scale, split_rows
        )  # fmt: skip
    targets = [c.advance(1) for c in into]
    (queries,) = ops.attention_inputs(
        x, weights, q_norm, k_norm, positions, heads, kv_heads, head_dim, eps, 1.0, dims, base, scale, False,
        [c.keys for c in into], [c.values for c in into], [index for index, _ in targets],
    )  # fmt: skip
    return queries, [span for _, span in targets]


def _writable_in_place(caches: list, ops) -> bool:
    """Whether a native operation may write a step's k and v into these caches' buffers itself: they
    have room, and nothing but the cache sees them (no view of them, no pending operation on them,
    no other handle), so that no one can tell the buffer changed (MLX's own test for donating a
    buffer to an operation's output). Otherwise MLX writes them (2 operations per cache)."""
    return all(
        hasattr(c, "advance") and c.room() > 0 and ops.exclusive(c.keys) and ops.exclusive(c.values)
        for c in caches
    )


def _attention_inputs(attention: nn.Module, x: mx.array, cache) -> tuple[mx.array, mx.array, mx.array]:
    """mlx-lm Gemma 3's (q, k, v) for a decode step, one MLX operation at a time."""
    b, length, _ = x.shape
    q, k, v = attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)
    q = attention.q_norm(q.reshape(b, length, attention.n_heads, -1).transpose(0, 2, 1, 3))
    k = attention.k_norm(k.reshape(b, length, attention.n_kv_heads, -1).transpose(0, 2, 1, 3))
    v = v.reshape(b, length, attention.n_kv_heads, -1).transpose(0, 2, 1, 3)
    return attention.rope(q, offset=cache.offset), attention.rope(k, offset=cache.offset), v


def _gemma_decode_attention(attention: nn.Module, x: mx.array, mask, cache, ops) -> mx.array:
    """A decode step's attention before its output projection, (B, 1, H * D). Its inputs come from
    one native operation instead of 13 where the projections are int8, which also writes k and v
    into the caches where it may; attention reads each agent's cache buffer over the range it needs
    (no slice operations, no padding for a batch)."""
    batch = hasattr(cache, "update_in_place")  # node.runtime.batching's view of several agents' caches
    caches = cache.caches if batch else [cache]
    if (
        (batch or mask is None)
        and _writable_in_place(caches, ops)
        and (fused := _fused_attention_inputs(attention, x, cache, ops, into=caches))
    ):
        queries, ranges = fused
        keys, values = [c.keys for c in caches], [c.values for c in caches]
        return ops.decode_attention_ragged(queries, keys, values, ranges, attention.scale).reshape(
            x.shape[0], 1, -1
        )
    queries, keys, values = _fused_attention_inputs(attention, x, cache, ops, batch) or _attention_inputs(
        attention, x, cache
    )
    if queries.dtype == mx.float32 and batch:
        keys, values, ranges = cache.update_in_place(keys, values)
        output = ops.decode_attention_ragged(queries, keys, values, ranges, attention.scale)
    elif queries.dtype == mx.float32 and mask is None and hasattr(cache, "append"):
        k, v, positions = kv_cache.update_in_place(cache, keys, values)
        output = ops.decode_attention_ragged(queries, [k], [v], [positions], attention.scale)
    else:
        keys, values = cache.update_and_fetch(keys, values)
        sdpa = sys.modules[type(attention).__mro__[1].__module__].scaled_dot_product_attention
        output = sdpa(queries, keys, values, cache=cache, scale=attention.scale, mask=mask)
    return output.reshape(x.shape[0], 1, -1)  # (B, H, 1, D) is (B, 1, H * D) in memory


def _gemma_attention(self, x: mx.array, mask=None, cache=None) -> mx.array:
    """Gemma 3's attention, decode steps through `_gemma_decode_attention`."""
    ops = cpu_extension.extension()
    if cache is None or x.shape[1] != 1 or ops is None:
        return type(self).__mro__[1].__call__(self, x, mask, cache)
    return self.o_proj(_gemma_decode_attention(self, x, mask, cache, ops))


def _block_arguments(block: nn.Module) -> tuple | None:
    """A Gemma 3 layer's modules and weights for the fused decode step, or None where it does not
    fit (linear layers not int8, norms with different eps)."""
    attention, mlp = block.self_attn, block.mlp
    norms = (
        block.post_attention_layernorm,
        block.pre_feedforward_layernorm,
        block.post_feedforward_layernorm,
    )
    if (
        not _int8(attention.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        or len({n.eps for n in norms}) != 1
    ):
        return None
    mlp_weights = [
        a for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj) for a in (layer.weight, layer.scales)
    ]
    return (
        attention, block.input_layernorm, attention.o_proj.weight, attention.o_proj.scales, norms[0].weight,
        norms[1].weight, mlp_weights, norms[2].weight, norms[0].eps,
    )  # fmt: skip


def _gemma_block(self, x: mx.array, mask=None, cache=None) -> mx.array:
    """Gemma 3's decoder layer. In a decode step with int8 layers: attention, then its output
    projection, norm and residual as one native operation, then the MLP with both its norms and
    its residual as another (`native/decode_blocks.cpp`)."""
    ops = cpu_extension.extension()
    if (
        ops is None or cache is None or x.shape[1] != 1 or x.dtype != mx.float32
        or (arguments := _decode_arguments(self, _block_arguments)) is None
    ):  # fmt: skip
        return type(self).__mro__[1].__call__(self, x, mask, cache)
    attention, input_norm, o_weight, o_scales, post_attention, pre_mlp, mlp_weights, post_mlp, eps = arguments
    attended = _gemma_decode_attention(attention, input_norm(x), mask, cache, ops)
    h = ops.attention_output(x, attended, o_weight, o_scales, post_attention, eps, 1.0)
    return ops.gated_mlp(h, pre_mlp, mlp_weights, post_mlp, eps, 1.0)


# mlx-lm model modules whose `MLP` is down(act(gate(x)) * up(x)), and that act as a fused function.
GATED_MLP_ACTIVATIONS = {
    "mlx_lm.models.gemma3_text": gelu_approx_gate,
    "mlx_lm.models.llama": swiglu,
}


def _scoped_call(cls: type):
    """The top-level model's `__call__`, marking its forward passes for the fast attention."""

    def __call__(self, *args, **kwargs):
        token = _installed_model_running.set(True)
        try:
            return cls.__call__(self, *args, **kwargs)
        finally:
            _installed_model_running.reset(token)

    return __call__


def _fast_call(m: nn.Module, top: bool = False):
    """The replacement `__call__` for one module instance, or None to keep its own."""
    if top:
        return _scoped_call(type(m))
    if type(m) is nn.RoPE:
        return _table_rope
    if type(m) is nn.RMSNorm:
        return _native_rms_norm(0.0)
    if type(m).__name__ == "RMSNorm" and type(m).__module__ in OFFSET_RMS_NORMS:
        return _native_rms_norm(1.0)
    if type(m).__name__ == "Attention" and type(m).__module__ == "mlx_lm.models.gemma3_text":
        return _gemma_attention
    if type(m).__name__ == "TransformerBlock" and type(m).__module__ == "mlx_lm.models.gemma3_text":
        return _gemma_block
    activation = GATED_MLP_ACTIVATIONS.get(type(m).__module__)
    if activation is not None and type(m).__name__ == "MLP":
        return _gated_mlp(activation)
    return None


_fast_classes: dict[type, type] = {}  # original class -> subclass with the fast __call__


def _is_fast(m: nn.Module) -> bool:
    return type(m) in _fast_classes.values()


def _model_modules(model: nn.Module) -> list:
    names = {type(m).__module__ for _, m in model.named_modules()}
    return [sys.modules[name] for name in sorted(names) if name in sys.modules]


def install(model: nn.Module) -> list[str]:
    """Use the fast kernels for `model` on the CPU backend; returns what was replaced.

    MLPs and RoPE are replaced per layer instance. Attention is replaced in the architecture's
    module, but only takes the fast path inside this model's forward passes (`_scoped_call`):
    other models in the process keep MLX's kernels. Call it once the weights are final (the engine
    quantizes first): layers keep their decode arguments until the next install or uninstall.
    """
    if mx.default_device() != mx.cpu:
        return []
    _forget_decode_arguments(model)
    replaced: set[str] = set()
    for module in _model_modules(model):
        sdpa = getattr(module, "scaled_dot_product_attention", None)
        if sdpa is not None:
            if not hasattr(sdpa, "fallback"):
                module.scaled_dot_product_attention = _fast_sdpa(sdpa)
            replaced.add(f"{module.__name__}.scaled_dot_product_attention")
    for name, m in model.named_modules():
        call = None if _is_fast(m) else _fast_call(m, top=m is model)
        if call is not None:
            cls = type(m)
            if cls not in _fast_classes:
                _fast_classes[cls] = type(cls.__name__, (cls,), {"__call__": call, "__module__": __name__})
            m.__class__ = _fast_classes[cls]
        if _is_fast(m) and m is not model:
            original = type(m).__mro__[1]
            replaced.add(f"{original.__module__}.{original.__name__}")
    return sorted(replaced)


def uninstall(model: nn.Module) -> None:
    """Back to MLX's own kernels (benchmarks compare both in one process)."""
    _forget_decode_arguments(model)
    for module in _model_modules(model):
        sdpa = getattr(module, "scaled_dot_product_attention", None)
        if hasattr(sdpa, "fallback"):
            module.scaled_dot_product_attention = sdpa.fallback
    for _, m in model.named_modules():
        if _is_fast(m):
            m.__class__ = type(m).__mro__[1]


def installed(model: nn.Module) -> bool:
    return any(_is_fast(m) for _, m in model.named_modules()) or any(
        hasattr(getattr(module, "scaled_dot_product_attention", None), "fallback")
        for module in _model_modules(model)
    )


@contextmanager
def mlx_defaults(model: nn.Module) -> Iterator[bool]:
    """Run `model` on MLX's own kernels and plain sgemm inside the block (side-by-side benchmarks).

    Yields whether anything was switched off; only use it while the model is idle.
    """
    was_installed = installed(model)
    if was_installed:
        uninstall(model)
    forwarding = blas.set_thin_sgemm(False)
    try:
        yield was_installed or forwarding
    finally:
        if forwarding:
            blas.set_thin_sgemm(True)
        if was_installed:
            install(model)

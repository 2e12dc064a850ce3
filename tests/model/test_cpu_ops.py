"""node's MLX CPU extension (node/model/native): decode attention, RMS norm and RoPE against MLX's
own operations or float64 references, and decode steps of the tiny model with and without them."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from node.model import cpu_kernels
from node.runtime.batching import batched_step
from node.runtime.generation import CachedContext, SamplingParams, Sequence, prefill, step


def _normal(rng, *shape) -> mx.array:
    return mx.array(rng.standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "positions", "dim"),
    [
        (1, 4, 1, 70, 256),
        (1, 4, 1, 2049, 256),
        (3, 4, 1, 600, 256),
        (1, 8, 2, 1000, 64),
        (1, 4, 1, 1, 256),
        (1, 4, 2, 37, 80),
        (2, 6, 3, 130, 72),
    ],
)
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_matches_mlx(ops, batch, heads, kv_heads, positions, dim, masked):
    """Views into a larger cache buffer (as the KV caches hand them over), grouped heads, masks."""
    rng = np.random.default_rng(positions)
    q = _normal(rng, batch, heads, 1, dim)
    buffer_k, buffer_v = (
        _normal(rng, batch, kv_heads, positions + 9, dim),
        _normal(rng, batch, kv_heads, positions + 9, dim),
    )
    k, v = buffer_k[:, :, 4 : positions + 4], buffer_v[:, :, 4 : positions + 4]
    mask = None
    if masked:
        visible = rng.random((batch, 1, 1, positions)) > 0.3
        visible[..., -1] = True
        mask = mx.array(visible)
    got = ops.decode_attention(q, k, v, 0.0625, mask)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.0625, mask=mask)
    assert np.abs(np.array(got) - np.array(want)).max() < 1e-5


def test_ragged_decode_attention_matches_each_sequence_alone(ops):
    """Sequences of different lengths (cache views of their own buffers) in one call."""
    rng = np.random.default_rng(3)
    lengths = (5, 700, 260)
    q = _normal(rng, len(lengths), 4, 1, 256)
    buffers = [_normal(rng, 1, 1, n + 3, 256) for n in lengths]
    keys = [b[:, :, 1 : n + 1] for b, n in zip(buffers, lengths)]
    values = [b[:, :, 2 : n + 2] for b, n in zip(buffers, lengths)]
    got = np.array(ops.decode_attention_ragged(q, keys, values, [(0, n) for n in lengths], 0.0625))
    # the same through ranges of the whole buffers, as the caches hand them over
    shifted = [b[:, :, 1:] for b in buffers]  # so that positions [1, n + 1) are the values above
    ranged = ops.decode_attention_ragged(
        q, [b[:, :, :-1] for b in buffers], shifted, [(1, n + 1) for n in lengths], 0.0625
    )
    for i, (k, v) in enumerate(zip(keys, values)):
        want = np.array(mx.fast.scaled_dot_product_attention(q[i : i + 1], k, v, scale=0.0625))
        assert np.abs(got[i : i + 1] - want).max() < 1e-5
        assert np.abs(np.array(ranged)[i : i + 1] - want).max() < 1e-5
    with pytest.raises(ValueError, match="range"):
        ops.decode_attention_ragged(q, keys, values, [(0, n + 1) for n in lengths], 0.0625)


def test_decode_attention_reads_transposed_keys(ops):
    rng = np.random.default_rng(1)
    q = _normal(rng, 1, 1, 4, 64).transpose(0, 2, 1, 3)  # (1, 4, 1, 64), not row-contiguous
    k = _normal(rng, 1, 1, 64, 300).swapaxes(-1, -2)  # last axis strided
    got = ops.decode_attention(q, k, k, 0.125)
    want = mx.fast.scaled_dot_product_attention(q, k, k, scale=0.125)
    assert np.abs(np.array(got) - np.array(want)).max() < 1e-5


def test_decode_attention_refuses_bad_shapes(ops):
    q, k = mx.zeros((1, 3, 1, 64)), mx.zeros((1, 2, 10, 64))
    with pytest.raises(ValueError, match="multiple of the KV heads|1-16 times"):
        ops.decode_attention(q, k, k, 1.0)
    with pytest.raises(ValueError, match="mask"):
        ops.decode_attention(mx.zeros((1, 2, 1, 64)), k, k, 1.0, mx.ones((1, 1, 1, 9), mx.bool_))


@pytest.mark.parametrize("shape", [(3, 262144), (1, 100_003), (2, 4, 1000), (5, 17), (1, 1)])
def test_argmax_matches_mlx(ops, shape):
    rng = np.random.default_rng(5)
    x = _normal(rng, *shape)
    assert ops.argmax_rows(x).dtype == mx.uint32
    assert ops.argmax_rows(x).tolist() == mx.argmax(x, axis=-1).tolist()
    # columns; the same index for every row
    assert ops.argmax_rows(x.swapaxes(-1, 0)).tolist() == mx.argmax(x.swapaxes(-1, 0), axis=-1).tolist()


def test_argmax_takes_the_first_of_equal_maxima(ops):
    x = np.full((4, 70_000), -np.inf, np.float32)
    x[1, [5, 40_000, 69_999]] = 3.0  # ties in different lanes and in both halves of the row
    x[2, [34_990, 35_000, 69_998]] = 1.0  # a tie across the two threads' halves: the first wins
    x[3, 69_999] = 2.0  # the tail after the last full vector
    assert (
        ops.argmax_rows(mx.array(x)).tolist()
        == [0, 5, 34_990, 69_999]
        == mx.argmax(mx.array(x), axis=-1).tolist()
    )


@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
def test_rms_norm_matches_mlx(ops, weight_offset):
    rng = np.random.default_rng(2)
    x, w = _normal(rng, 2, 5, 640), _normal(rng, 640)
    got = ops.rms_norm(x.transpose(1, 0, 2), w, 1e-6, weight_offset)
    want = mx.fast.rms_norm(x.transpose(1, 0, 2), weight_offset + w, 1e-6)
    assert np.abs(np.array(got) - np.array(want)).max() < 1e-5


@pytest.mark.parametrize("offset", [0, 70, 8191, 30000])
def test_rope_is_exact_in_float64(ops, offset):
    """Positions offsets[b] + l; one offset for all rows or one per batch row; dims < D keep the rest."""
    rng = np.random.default_rng(offset)
    x = _normal(rng, 2, 4, 3, 96)
    offsets = np.array([offset, offset + 11])
    got = np.array(ops.rope(x, 64, 10000.0, 1.0, mx.array(offsets, mx.int32)))
    positions = offsets[:, None] + np.arange(3)[None]  # (B, L)
    angles = positions[..., None] * 10000.0 ** (-np.arange(0, 64, 2) / 64)  # (B, L, 32)
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
    x64 = np.array(x).astype(np.float64)
    x1, x2 = x64[..., :32], x64[..., 32:64]
    want = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x64[..., 64:]], -1)
    assert np.abs(got - want).max() < 1e-5


def _greedy(engine, prompt: list[int], tokens: int) -> list[int]:
    sequence = Sequence(
        engine, CachedContext(engine.make_caches()), prompt, SamplingParams(max_tokens=tokens)
    )
    while sequence.prefilling:
        sequence.prefill_chunk()
    while sequence.wants_step():
        step(engine.model, sequence)
    return sequence.generated


def test_decode_steps_keep_the_models_tokens(tiny_engine, monkeypatch, ops, float_activations):
    """Greedy decoding through the native decode path and through MLX's own kernels agree."""
    prompt = tiny_engine.encode("the cat sat on the mat and then " * 6)
    native = []  # query rows of each native attention call
    attend = ops.decode_attention_ragged
    monkeypatch.setattr(
        ops, "decode_attention_ragged", lambda q, *a: native.append(q.shape[2]) or attend(q, *a)
    )
    fast = _greedy(tiny_engine, prompt, 24)
    assert len(native) == len(fast) * len(tiny_engine.model.layers)  # every decode step, every layer
    cpu_kernels.uninstall(tiny_engine.model)
    try:
        reference = _greedy(tiny_engine, prompt, 24)
    finally:
        cpu_kernels.install(tiny_engine.model)
    assert fast == reference


@pytest.mark.parametrize("ragged", [True, False])
def test_batched_decode_matches_single_sequences(tiny_engine, monkeypatch, ragged, float_activations):
    """Sequences of different lengths in one batch decode what each does alone: handed to the native
    kernel per sequence (ragged), or left-padded and masked."""
    from node.runtime.batching import BatchedLayerCache

    model = tiny_engine.model
    calls = []
    fetch = BatchedLayerCache.update_in_place
    monkeypatch.setattr(BatchedLayerCache, "update_in_place", lambda *a: calls.append(1) or fetch(*a))
    if not ragged:
        monkeypatch.delattr(BatchedLayerCache, "update_in_place")
    prompts = [
        tiny_engine.encode(text) for text in ("a short one", "the cat sat on the mat " * 9, "dogs " * 30)
    ]
    alone = [_greedy(tiny_engine, p, 8) for p in prompts]
    sequences = []
    for p in prompts:
        context = CachedContext(tiny_engine.make_caches())
        prefill(model, context, p[:-1])
        sequences.append(Sequence(tiny_engine, context, p, SamplingParams(max_tokens=8)))
    for _ in range(8):
        batched_step(model, sequences)
    assert [s.generated for s in sequences] == alone
    assert bool(calls) == ragged


def _int8_gemma():
    """A random Gemma 3 whose projections are multiples of the int8 block (the tiny GGUF's are not):
    int8 layers and node's kernels installed, as the engine does on the CPU."""
    from mlx_lm.models import gemma3_text

    from node.model import int8_weights

    args = gemma3_text.ModelArgs(
        model_type="gemma3_text", hidden_size=128, num_hidden_layers=6, intermediate_size=256,
        num_attention_heads=4, head_dim=64, num_key_value_heads=1, vocab_size=512, sliding_window=16,
        sliding_window_pattern=3, max_position_embeddings=1024,
    )  # fmt: skip
    mx.random.seed(7)
    model = gemma3_text.Model(args)
    mx.eval(model.parameters())
    assert int8_weights.quantize_model(model) > 0
    cpu_kernels.install(model)
    return model


def _decode_logits(model, prompt: list[int], steps: int) -> list[np.ndarray]:
    from node.model.kv_cache import make_caches

    caches = make_caches(model)
    logits = model(mx.array([prompt]), cache=caches)[:, -1, :]
    rows = []
    for _ in range(steps):
        rows.append(np.array(logits))
        logits = model(mx.argmax(logits, axis=-1)[None], cache=caches)[:, -1, :]
    return rows


def test_fused_decode_layers_keep_the_models_logits(monkeypatch, float_activations):
    """Decode steps through the fused layer (attention_inputs writing k and v into the caches,
    decode attention, attention_output, gated_mlp), the same with k and v written through MLX, with
    separate attention inputs and with MLX's own operations throughout, past the sliding window."""
    model = _int8_gemma()
    prompt = list(range(3, 40))
    into = []
    fused = cpu_kernels._fused_attention_inputs
    monkeypatch.setattr(
        cpu_kernels, "_fused_attention_inputs", lambda *a, **k: into.append(k.get("into")) or fused(*a, **k)
    )
    fast = _decode_logits(model, prompt, 12)
    assert into and all(into)  # every layer's k and v went straight into its cache
    monkeypatch.setattr(cpu_kernels, "_writable_in_place", lambda *a: False)
    into.clear()
    written_by_mlx = _decode_logits(model, prompt, 12)
    assert into and not any(into)
    monkeypatch.setattr(cpu_kernels, "_fused_attention_inputs", lambda *a, **k: None)
    separate = _decode_logits(model, prompt, 12)
    cpu_kernels.uninstall(model)  # MLX's own operations throughout (int8 products stay)
    try:
        reference = _decode_logits(model, prompt, 12)
    finally:
        cpu_kernels.install(model)
    for a, b, c, d in zip(fast, written_by_mlx, separate, reference):
        assert np.array_equal(a, b)
        assert np.abs(a - c).max() < 1e-3
        assert np.abs(a - d).max() < 1e-3


@pytest.mark.parametrize("case", ["in_place", "split_rows", "same_bits"])
def test_fused_batch_hands_each_agent_its_own_keys_and_values(monkeypatch, ops, request, case):
    """In a batch, the fused attention inputs write k and v into each agent's cache (in_place), or
    hand them out per agent (split_rows: no slice operations before MLX writes them); two steps of
    three agents of different lengths, past the sliding window, give each agent's logits alone. On
    the VNNI path (same_bits) they are the same bits: a row's products are exact integer sums and
    the decode attention chunks a sequence by its own length, so an agent's answer does not depend
    on who shares its batch."""
    from node.model.kv_cache import make_caches
    from node.runtime.batching import BatchedLayerCache

    if case != "same_bits":
        request.getfixturevalue("float_activations")
    elif ops.isa() != "avx512vnni":
        pytest.skip(
            "bit-identical rows need the VNNI path (the float paths sum 1 and 3 rows in different orders)"
        )
    model = _int8_gemma()
    # alone, 300 positions go in chunks of 48; batched with the others (405) they went in 64s
    prompts = [list(range(3, 3 + n)) for n in (5, 100, 300)]
    calls = []
    fused = ops.attention_inputs
    monkeypatch.setattr(ops, "attention_inputs", lambda *a: calls.append(a) or fused(*a))
    in_place = case != "split_rows"
    if not in_place:
        monkeypatch.setattr(cpu_kernels, "_writable_in_place", lambda *a: False)

    def prefilled(prompt):
        caches = make_caches(model)
        mx.eval(model(mx.array([prompt[:-1]]), cache=caches))
        return caches

    alone, batch = [prefilled(p) for p in prompts], [prefilled(p) for p in prompts]
    inputs = [p[-1] for p in prompts]
    for _ in range(2):
        expected = [np.array(model(mx.array([[t]]), cache=c)[0, -1]) for t, c in zip(inputs, alone)]
        calls.clear()
        offset = mx.array([c[0].offset for c in batch])
        views = [BatchedLayerCache([c[i] for c in batch], offset) for i in range(len(model.layers))]
        got = np.array(model(mx.array([[t] for t in inputs]), cache=views)[:, -1])
        assert len(calls) == len(model.layers)
        if in_place:  # every layer wrote into the three agents' buffers
            assert all(len(a) == 17 and len(a[-1]) == 3 for a in calls)
        else:  # every layer's k and v came out per agent
            assert all(len(a) == 14 and a[-1] for a in calls)
        for row, want in zip(got, expected):
            assert np.array_equal(row, want) if case == "same_bits" else np.abs(row - want).max() < 1e-4
        inputs = [int(np.argmax(row)) for row in got]
        assert [c[0].offset for c in batch] == [c[0].offset for c in alone]


def test_a_decode_step_never_writes_into_a_buffer_another_array_sees(monkeypatch, ops):
    """A context started as a view of another's buffers (a shared prefix): when the other rewinds
    and decodes, its step must not write into the shared buffer in place (the view would change
    under its holder); MLX writes it into a copy instead, and later steps go in place again."""
    from node.model import kv_cache

    model = _int8_gemma()
    prompt = list(range(3, 30))
    owner = kv_cache.make_caches(model)
    mx.eval(model(mx.array([prompt]), cache=owner))
    view = kv_cache.prefix_views(owner, len(prompt), kv_cache.make_caches(model))
    mx.eval([c.keys for c in view] + [c.values for c in view])
    seen = [(np.array(c.keys), np.array(c.values)) for c in view]
    assert not ops.exclusive(owner[0].keys)
    kv_cache.trim_to(owner, len(prompt) - 3)  # the next step writes inside the view's positions
    into = []
    fused = cpu_kernels._fused_attention_inputs
    monkeypatch.setattr(
        cpu_kernels, "_fused_attention_inputs", lambda *a, **k: into.append(k.get("into")) or fused(*a, **k)
    )
    mx.eval(model(mx.array([[7]]), cache=owner))
    assert into and not any(into)
    for (keys, values), cache in zip(seen, view):
        assert np.array_equal(np.array(cache.keys), keys) and np.array_equal(np.array(cache.values), values)
    into.clear()
    mx.eval(model(mx.array([[8]]), cache=owner))  # the copy is the owner's alone
    assert into and all(into)

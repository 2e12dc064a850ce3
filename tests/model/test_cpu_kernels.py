"""The CPU fast paths agree with MLX's own kernels and BLAS calls."""

from __future__ import annotations

import platform
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn

from node.model import blas, cpu_kernels


def test_tanh_matches_reference_over_all_magnitudes():
    x = np.concatenate([np.linspace(-20, 20, 400_001), [0.0, 1e-30, -1e-30, 1e30, -1e30]]).astype(np.float32)
    got = np.array(cpu_kernels.tanh(mx.array(x)))
    assert np.abs(got - np.tanh(x.astype(np.float64))).max() < 1e-6


def test_exp_matches_reference_and_flushes_tiny_results_to_zero():
    x = np.linspace(-86.99, 0, 300_001).astype(np.float32)
    got = np.array(cpu_kernels.exp_nonpositive(mx.array(x))).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    assert (np.abs(got - want) / want).max() < 3e-7
    below = np.array(cpu_kernels.exp_nonpositive(mx.array([-87.5, -100.0, -1e30, -np.inf], mx.float32)))
    assert (below == 0).all()  # no subnormals: they make the following matmul ~50x slower


@pytest.mark.parametrize(
    ("fast", "reference"),
    [
        (cpu_kernels.gelu_approx_gate, lambda g, u: nn.gelu_approx(g) * u),
        (cpu_kernels.swiglu, lambda g, u: nn.silu(g) * u),
    ],
    ids=["gemma-gelu", "llama-swiglu"],
)
def test_gated_activations_match_mlx(fast, reference):
    gate = mx.random.normal((3, 17, 64), key=mx.random.key(1)) * 4
    up = mx.random.normal((3, 17, 64), key=mx.random.key(2))
    assert mx.allclose(fast(gate, up), reference(gate, up), atol=1e-5, rtol=1e-5).item()


def _qkv(length: int, kv_length: int, heads: int = 4, kv_heads: int = 1, dim: int = 32):
    keys = mx.random.split(mx.random.key(length * 1000 + kv_length), 3)
    return (
        mx.random.normal((2, heads, length, dim), key=keys[0]),
        mx.random.normal((2, kv_heads, kv_length, dim), key=keys[1]),
        mx.random.normal((2, kv_heads, kv_length, dim), key=keys[2]),
    )


@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool-window", "additive"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_attention_matches_mlx_sdpa(mask_kind, kv_heads):
    from mlx_lm.models.base import create_causal_mask

    q, k, v = _qkv(24, 40, kv_heads=kv_heads)
    mask = {
        "none": None,
        "causal": "causal",
        "bool-window": create_causal_mask(24, 16, window_size=10),
        "additive": mx.random.normal((24, 40), key=mx.random.key(7)),
    }[mask_kind]
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.17, mask=mask)
    got = cpu_kernels.attention(q, k, v, 0.17, mask)
    assert mx.allclose(got, want, atol=2e-6, rtol=1e-5).item()


@pytest.mark.parametrize(
    ("length", "offset", "window"),
    [
        (512, 0, None),
        (512, 0, 512),
        (300, 700, 512),
        (200, 300, None),
        (260, 5, 64),
        (7, 0, None),
        (130, 5, 4),
    ],
)
def test_blocked_causal_attention_matches_masked(length, offset, window):
    from mlx_lm.models.base import create_causal_mask

    first_key = 0 if window is None else max(0, offset - (window - 1))
    q, k, v = _qkv(length, offset + length - first_key)
    mask = create_causal_mask(length, offset, window_size=window)[:, first_key:]
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.17, mask=mask)
    got = cpu_kernels.blocked_causal_attention(q, k, v, 0.17, first_key, window)
    assert mx.allclose(got, want, atol=2e-6, rtol=1e-5).item()


def test_installed_kernels_keep_the_models_output(tiny_engine, monkeypatch, float_activations):
    model, prompt = tiny_engine.model, mx.array([tiny_engine.encode("the cat sat on the mat " * 12)])
    blocked_calls = []
    blocked = cpu_kernels.blocked_causal_attention
    monkeypatch.setattr(cpu_kernels, "QUERY_BLOCK", 16)  # so that the tiny prompt spans several blocks
    monkeypatch.setattr(
        cpu_kernels, "blocked_causal_attention", lambda *a: blocked_calls.append(a[-1]) or blocked(*a)
    )
    assert mx.default_device() == mx.cpu
    assert any(name.endswith("gemma3_text.MLP") for name in tiny_engine.info.kernels)
    assert any(name.endswith(".RoPE") for name in tiny_engine.info.kernels)
    fast = model(prompt, cache=tiny_engine.make_caches())
    cpu_kernels.uninstall(model)
    try:
        reference = model(prompt, cache=tiny_engine.make_caches())
    finally:
        replaced = cpu_kernels.install(model)
    assert "mlx_lm.models.gemma3_text.scaled_dot_product_attention" in replaced
    assert {None, 8} <= set(blocked_calls)  # the global layer and the sliding-window layers went by blocks
    assert mx.allclose(fast, reference, atol=1e-4, rtol=1e-4).item()


needs_thin_sgemm = pytest.mark.skipif(
    platform.system() != "Linux" or shutil.which("cc") is None,
    reason="the thin-sgemm library is built on Linux with cc",
)


@needs_thin_sgemm
@pytest.mark.parametrize(
    ("m", "k", "n"),
    [
        (1, 640, 300),
        (2, 64, 50),
        (9, 33, 1),
        (7, 20, 2),
        (1, 5, 1),
        (3, 8, 4),
        (3, 1024, 4096),
        (8, 512, 8195),
    ],
)
@pytest.mark.parametrize("transposed", ["none", "a", "b", "both"])
def test_thin_matmuls_match_numpy(m, k, n, transposed):
    assert blas.thin_calls() is not None, "the thin-sgemm library was not loaded"
    rng = np.random.default_rng(m * 100 + n)
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    ma = mx.array(a.T.copy()).T if transposed in ("a", "both") else mx.array(a)
    mb = (
        mx.array(b.T.copy()).T if transposed in ("b", "both") else mx.array(b)
    )  # "b": weights as nn.Linear keeps them
    before = blas.thin_calls()
    got = np.array(ma @ mb)
    assert np.abs(got - a.astype(np.float64) @ b).max() < 1e-3
    few_rows = m <= 8 and transposed == "b" and n * k >= 1 << 16
    assert (blas.thin_calls() > before) == (min(m, n) <= 2 or few_rows)


def test_no_compiler_means_plain_sgemm(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    assert blas.build_thin_sgemm(tmp_path / "native") is None


@pytest.mark.parametrize("offset", [0, 7680, 30000])
def test_table_rope_is_exact_where_mlx_rope_drifts(offset):
    rope = nn.RoPE(64, traditional=False, base=10000.0)
    x = mx.random.normal((1, 4, 96, 64), key=mx.random.key(offset))
    angles = np.arange(offset, offset + 96)[:, None] * 10000.0 ** (-np.arange(0, 64, 2) / 64)[None]
    x64 = np.array(x).astype(np.float64)
    x1, x2 = x64[..., :32], x64[..., 32:]
    want = np.concatenate(
        [x1 * np.cos(angles) - x2 * np.sin(angles), x2 * np.cos(angles) + x1 * np.sin(angles)], -1
    )
    got = np.array(cpu_kernels._table_rope(rope, x, offset))
    mlx = np.array(rope(x, offset))
    assert np.abs(got - want).max() < 1e-5
    assert np.abs(got - want).max() <= np.abs(mlx - want).max() + 1e-6
    one_row = np.array(cpu_kernels._table_rope(rope, x[:, :, :1], offset))  # a decode step: native
    assert np.abs(one_row - want[:, :, :1]).max() < 1e-5

"""The int8 decode weights: the native kernel against numpy on every path this CPU can run, the
quantizer, the layers that replace nn.Linear / nn.Embedding, and the fallback without a compiler."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn

from node.model import cpu_extension, int8_weights

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the int8 kernel is built on Linux here")

BLOCK = int8_weights.BLOCK


@pytest.fixture(scope="module")
def ext():
    module = int8_weights.extension()
    assert module is not None, int8_weights.failure()
    yield module
    module.use_isa(module.supported_isas()[0])


def _reference(x: np.ndarray, q: mx.array, scales: mx.array) -> np.ndarray:
    """x @ W^T in float64, W the matrix the int8 weights and scales stand for."""
    q, scales = int8_weights.row_major(q, scales)
    w = np.array(q).astype(np.float64).reshape(q.shape[0], -1, BLOCK) * np.array(scales)[..., None]
    return x.astype(np.float64) @ w.reshape(q.shape).T


def _random(rng, *shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def test_the_best_path_for_this_cpu_is_chosen(ext):
    supported = ext.supported_isas()
    assert supported[-1] == "portable"
    assert ext.isa() == supported[0]
    with open("/proc/cpuinfo") as cpuinfo:
        flags = cpuinfo.read()
    assert ("avx512f" in supported) == (" avx512f" in flags)
    assert ("avx2" in supported) == (" avx2" in flags and " fma" in flags)


def test_weights_are_packed_in_panels_where_the_vnni_kernel_reads_them(ext):
    vnni = ext.supported_isas()[0] == "avx512vnni"
    assert ext.PANEL == 16
    assert ext.packed(1024) == vnni and ext.packed(262144) == vnni
    assert not ext.packed(1030) and not ext.packed(37)


@pytest.mark.parametrize("count", [37, 48])  # rows as they are, rows of whole panels (packed with VNNI)
def test_quantize_maps_each_block_to_127(ext, count):
    rng = np.random.default_rng(1)
    w = _random(rng, count, 3 * BLOCK)
    w[3, :BLOCK] = 0.0  # an all-zero block keeps scale 0
    q, scales = int8_weights.row_major(*ext.quantize(mx.array(w)))
    q, scales = np.array(q), np.array(scales)
    assert q.dtype == np.int8 and scales.shape == (count, 3)
    blocks = w.reshape(count, 3, BLOCK)
    np.testing.assert_allclose(scales, np.abs(blocks).max(-1) / 127, rtol=1e-6)
    assert np.abs(q).max() == 127 and not q[3, :BLOCK].any()
    restored = q.reshape(count, 3, BLOCK) * scales[..., None]
    assert np.all(np.abs(restored - blocks) <= scales[..., None] * 0.5 + 1e-7)


# Paths that quantize the activations per block as well (int8 x int8 dot products, as llama.cpp's).
QUANTIZED_INPUT_PATHS = {"avx512vnni"}


def _quantized_inputs(x: np.ndarray) -> np.ndarray:
    """x as the VNNI path sees it: per block of BLOCK inputs, rounded to 127 steps of its largest
    magnitude (float32 arithmetic, rounding half to even, as the kernel)."""
    blocks = x.astype(np.float32).reshape(*x.shape[:-1], -1, BLOCK)
    largest = np.abs(blocks).max(axis=-1, keepdims=True)
    inverse = np.where(largest > 0, np.float32(127) / np.where(largest > 0, largest, 1), 0).astype(np.float32)
    steps = np.rint(blocks * inverse)
    return (steps * (largest / np.float32(127))).reshape(x.shape)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 40])
@pytest.mark.parametrize(
    "outputs,inputs", [(13, BLOCK), (200, 5 * BLOCK), (1030, 10 * BLOCK), (256, 10 * BLOCK)]
)
def test_kernel_matches_numpy_on_every_path(ext, rows, outputs, inputs):
    rng = np.random.default_rng(rows * 1000 + outputs)
    q, scales = ext.quantize(mx.array(_random(rng, outputs, inputs)))
    x = _random(rng, rows, inputs)
    expected = _reference(x, q, scales)
    for isa in ext.supported_isas():
        assert ext.use_isa(isa) == isa
        got = np.array(ext.int8_matmul(mx.array(x), q, scales))
        quantized = ext.quantizes_inputs(rows, outputs)  # decode rows, or many on packed weights
        assert quantized == (
            isa in QUANTIZED_INPUT_PATHS and (rows <= ext.MAX_DIRECT_ROWS or outputs % 16 == 0)
        )
        want = _reference(_quantized_inputs(x), q, scales) if quantized else expected
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3 * np.sqrt(inputs), err_msg=isa)


@pytest.mark.parametrize("outputs", [2053, 2048])
def test_kernel_splits_large_products_across_threads(ext, float_activations, outputs):
    """Past MIN_PARALLEL_WEIGHTS the columns are split across the pool (1 and 2 threads agree)."""
    rng = np.random.default_rng(7)
    q, scales = ext.quantize(mx.array(_random(rng, outputs, 640)))
    x = _random(rng, 3, 640)
    expected = _reference(x, q, scales)
    threads = ext.threads()
    try:
        for count in (1, 2, 3):
            ext.set_threads(count)
            got = np.array(ext.int8_matmul(mx.array(x), q, scales))
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-2)
    finally:
        ext.set_threads(threads)


@pytest.mark.parametrize("outputs", [8200, 8192])  # 5.2M weights: two tiles (of whole panels, packed)
def test_prefill_sized_products_go_through_sgemm_in_tiles(ext, outputs):
    """Past MAX_DIRECT_ROWS rows W is dequantized (in tiles when large) and multiplied by sgemm."""
    rng = np.random.default_rng(11)
    q, scales = ext.quantize(mx.array(_random(rng, outputs, 640)))
    x = _random(rng, ext.MAX_DIRECT_ROWS + 1, 640)
    got = np.array(ext.int8_matmul(mx.array(x), q, scales))
    np.testing.assert_allclose(got, _reference(x, q, scales), rtol=1e-4, atol=1e-2)


def test_leading_axes_and_strided_inputs(ext, float_activations):
    rng = np.random.default_rng(3)
    q, scales = ext.quantize(mx.array(_random(rng, 96, 2 * BLOCK)))
    x = mx.array(_random(rng, 2 * BLOCK, 2, 3)).transpose(1, 2, 0)  # not row-contiguous
    got = np.array(ext.int8_matmul(x, q, scales))
    assert got.shape == (2, 3, 96)
    np.testing.assert_allclose(
        got, _reference(np.array(x).reshape(6, -1), q, scales).reshape(2, 3, 96), atol=1e-3
    )


def test_bad_shapes_are_refused(ext):
    q, scales = ext.quantize(mx.zeros((8, BLOCK)))
    with pytest.raises(ValueError):
        ext.int8_matmul(mx.zeros((1, BLOCK + 1)), q, scales)
    with pytest.raises(ValueError):
        ext.quantize(mx.zeros((8, BLOCK + 3)))


@pytest.mark.parametrize("vocabulary", [300, 304])  # 304: whole panels, packed with VNNI
def test_layers_replace_linear_and_embedding(ext, float_activations, vocabulary):
    rng = np.random.default_rng(5)
    model = nn.Sequential(nn.Embedding(vocabulary, 2 * BLOCK), nn.Linear(2 * BLOCK, 3 * BLOCK, bias=False))
    model.layers[0].weight = mx.array(_random(rng, vocabulary, 2 * BLOCK))
    model.layers[1].weight = mx.array(_random(rng, 3 * BLOCK, 2 * BLOCK))
    fp32_embedding, fp32_linear = np.array(model.layers[0].weight), np.array(model.layers[1].weight)
    assert int8_weights.quantize_model(model) == 2
    embedding, linear = model.layers
    assert isinstance(embedding, int8_weights.Int8Embedding) and isinstance(linear, int8_weights.Int8Linear)
    assert {v.dtype for k, v in model.parameters()["layers"][1].items()} == {mx.int8, mx.float32}
    assert model.layers[1].weight.dtype == mx.int8  # the fp32 matrix is gone, not kept beside it
    ids = mx.array([[0, 299, 17]])
    rows = np.array(embedding(ids))
    np.testing.assert_allclose(
        rows, np.array(int8_weights.dequantize(embedding.weight, embedding.scales))[[0, 299, 17]][None]
    )
    np.testing.assert_allclose(rows[0], fp32_embedding[[0, 299, 17]], atol=np.abs(fp32_embedding).max() / 127)
    x = _random(rng, 4, 2 * BLOCK)
    np.testing.assert_allclose(np.array(linear(mx.array(x))), x @ fp32_linear.T, rtol=0.05, atol=0.3)
    np.testing.assert_allclose(
        np.array(embedding.as_linear(mx.array(x))),
        _reference(x, embedding.weight, embedding.scales),
        atol=1e-3,
    )


def test_kernels_without_mlx_on_every_path(tmp_path):
    """The kernels alone (tests/model/native/int8_kernel_check.cpp) against a float64 reference,
    on every path the CPU supports: also what checks the AVX-512 path on a machine that has it."""
    compiler = cpu_extension.compiler()
    if compiler is None:
        pytest.skip("no C++ compiler")
    source = Path(__file__).parent / "native" / "int8_kernel_check.cpp"
    binary = tmp_path / "int8_kernel_check"
    build = [compiler, "-O2", "-std=gnu++20", "-pthread", str(source), "-o", str(binary)]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    result = subprocess.run([str(binary)], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout
    for isa in int8_weights.extension().supported_isas():
        assert f"path {isa} checked" in result.stdout


def test_without_a_compiler_the_node_keeps_fp32(tmp_path):
    """No C++ compiler on PATH and nothing built yet: a warning and fp32 weights, not a failure."""
    code = (
        "import node.model; from node.model import int8_weights as w; "
        "print(w.extension() is None, w.failure())"
    )
    env = {**os.environ, "PATH": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("CXX", None)
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("True no C++ compiler found"), result.stdout
    assert "int8 decode weights unavailable, keeping fp32" in result.stderr


def test_tiny_engine_runs_on_int8_layers(tiny_engine):
    """Layers whose inputs are a multiple of BLOCK become int8; the others keep fp32 and all run."""
    kinds = {type(m).__name__ for _, m in tiny_engine.model.named_modules()}
    assert "Int8Linear" in kinds
    assert any("int8 weights" in k for k in tiny_engine.info.kernels)
    logits = tiny_engine.model(mx.array([tiny_engine.encode("the cat")]))
    assert np.isfinite(np.array(logits)).all()


@pytest.mark.parametrize("count", [37, 48])  # rows as they are, rows of whole panels (packed with VNNI)
def test_int8_rows_reads_rows_in_either_layout(ext, count):
    rng = np.random.default_rng(9)
    q, scales = ext.quantize(mx.array(_random(rng, count, 2 * BLOCK)))
    table = np.array(int8_weights.dequantize(q, scales))
    unsigned = np.array(ext.int8_rows(q, scales, mx.array([[0], [17]], mx.uint32)))  # as argmax gives ids
    np.testing.assert_array_equal(unsigned, table[[[0], [17]]])
    got = np.array(ext.int8_rows(q, scales, mx.array([[0, count - 1], [17, -1]])))
    np.testing.assert_array_equal(got, table[[[0, count - 1], [17, count - 1]]])  # -1: the last, as in numpy
    outside = np.array(ext.int8_rows(q, scales, mx.array([count, 2 * count])))
    assert not outside.any()  # ids past the table give zero rows, not memory beyond it
    with pytest.raises(ValueError):
        ext.int8_rows(q, scales, mx.array([0.5]))

"""KV rows to their storage dtype and back: the native (F16C) path agrees with numpy's."""

from __future__ import annotations

import numpy as np
import pytest

from node.memory import kv_codec


def _rows(scale: float = 3.0) -> np.ndarray:
    rows = (np.random.default_rng(0).standard_normal((300, 2, 64)) * scale).astype(np.float32)
    rows[0, 0, :6] = [0.0, -0.0, 1e-8, -6e-5, 65504.0, -65504.0]
    return rows


def test_fp16_matches_numpy_bit_for_bit_and_overflow_falls_back_to_bf16():
    rows = _rows()
    stored, arrays = kv_codec.encode(rows, "float16")
    assert stored == "float16"
    assert np.array_equal(arrays[""].view(np.uint16), rows.astype(np.float16).view(np.uint16))
    rows[7, 1, 3] = 70000.0
    assert kv_codec.encode(rows, "float16")[0] == "bfloat16"
    rows[7, 1, 3] = np.nan
    assert kv_codec.encode(rows, "float16")[0] == "bfloat16"


@pytest.mark.parametrize("storage,tolerance", [("float16", 1e-3), ("bfloat16", 8e-3), ("int8", 1e-2)])
def test_decoding_into_a_strided_destination_matches_numpy(storage, tolerance):
    rows = _rows(scale=1.0)
    stored, arrays = kv_codec.encode(rows, storage)
    native = np.zeros((2, 300, 64), np.float32)  # head-major, as the caches hold K/V
    kv_codec.decode_into(native.transpose(1, 0, 2), stored, arrays)
    reference = np.zeros((300, 2, 64), np.float32)
    kv_codec._numpy_decode(reference, stored, arrays[""], arrays.get(".scale"))
    assert np.array_equal(native.transpose(1, 0, 2), reference)
    assert np.max(np.abs(reference - rows)) <= tolerance * np.max(np.abs(rows))

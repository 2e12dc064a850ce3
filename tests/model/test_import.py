"""Model loading: GGUF import (Gemma 3, Llama), the conversion cache, bad specs, the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlx.utils import tree_flatten

from node.errors import ModelImportError, ModelSpecError
from node.runtime.generation import CachedContext, SamplingParams, generate


def _fp32_parameters(model) -> tuple[dict, set[str]]:
    """The model's parameters with its int8 layers (node.model.int8_weights) dequantized, and
    the names of those: they carry int8 rounding (half a block scale) on top of the import."""
    from node.model.int8_weights import dequantize

    loaded = dict(tree_flatten(model.parameters()))
    int8 = {name for name, array in loaded.items() if array.dtype.size == 1}
    for name in int8:
        loaded[name] = dequantize(loaded[name], loaded.pop(name.removesuffix("weight") + "scales"))
    return loaded, int8


def _tolerance(array: np.ndarray, exact: float, int8: bool) -> float:
    return exact + (np.abs(array).max() / 254 if int8 else 0.0)


def test_gguf_import_round_trip(tiny_gguf, tiny_engine):
    from tests.tiny_models import tiny_weights

    expected = tiny_weights()
    loaded, int8 = _fp32_parameters(tiny_engine.model)
    assert set(expected) == set(loaded)
    for name, array in expected.items():
        exact = 0.02 if "mlp.up_proj" in name else 1e-6  # Q8_0 vs exact F32
        tolerance = _tolerance(array, exact, name in int8)
        np.testing.assert_allclose(np.array(loaded[name]), array, atol=tolerance, err_msg=name)
    config = json.loads(Path(tiny_engine.info.folder, "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["sliding_window"] == 8


def test_llama_gguf_import_round_trip(tmp_path, model_cache):
    import mlx.core as mx

    from node.model import cpu_kernels
    from node.model.engine import Engine
    from tests.tiny_models import write_tiny_llama_gguf

    expected = write_tiny_llama_gguf(tmp_path / "tiny-llama.gguf")
    engine = Engine.load(str(tmp_path / "tiny-llama.gguf"), progress=lambda m: None, cache_root=model_cache)
    loaded, int8 = _fp32_parameters(engine.model)
    assert set(expected) == set(loaded)
    for name, array in expected.items():  # Q/K rows back in Hugging Face order
        tolerance = _tolerance(array, 1e-6, name in int8)
        np.testing.assert_allclose(np.array(loaded[name]), array, atol=tolerance, err_msg=name)
    assert "mlx_lm.models.llama.MLP" in engine.info.kernels
    prompt = mx.array([engine.encode("the cat sat on the mat and the dog")])
    fast = engine.model(prompt, cache=engine.make_caches())
    cpu_kernels.uninstall(engine.model)
    reference = engine.model(prompt, cache=engine.make_caches())
    cpu_kernels.install(engine.model)
    assert mx.allclose(fast, reference, atol=1e-4, rtol=1e-4).item()
    completion = generate(
        engine, CachedContext(engine.make_caches()), engine.encode("the cat"), SamplingParams(max_tokens=5)
    )
    assert completion.usage.generated_tokens >= 1


def test_converted_model_is_cached(tiny_gguf, tiny_engine, model_cache):
    from node.model.engine import Engine

    messages: list[str] = []
    again = Engine.load(str(tiny_gguf), progress=messages.append, cache_root=model_cache)
    assert again.info.folder == tiny_engine.info.folder
    assert not any("converting" in m for m in messages)
    assert again.info.fingerprint == tiny_engine.info.fingerprint


def test_bad_model_specs_are_explained(tmp_path):
    from node.model.engine import Engine

    with pytest.raises(ModelSpecError, match="not found"):
        Engine.load(str(tmp_path / "missing"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ModelSpecError, match="neither an mlx-lm model folder nor a GGUF"):
        Engine.load(str(tmp_path / "junk.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSpecError, match="config.json"):
        Engine.load(str(tmp_path / "empty"))


def test_unsupported_gguf_architecture(tmp_path):
    import gguf

    from node.model.gguf_import import convert_gguf

    writer = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    writer.add_tensor("x", np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelImportError, match="'mamba' is not supported"):
        convert_gguf(tmp_path / "mamba.gguf", tmp_path, lambda m: None)


@pytest.mark.parametrize(
    "text",
    [
        "héllo wörld — 日本語 🙂 naïve",
        "  leading and trailing  \n\n\ttabs\r\n",
        "def f(x):\n    return {'a': [x ** 2]}  # ok\n",
    ],
)
def test_default_tokenizer_round_trips(engine, text):
    ids = engine.encode(text, add_bos=False)
    assert engine.decode(ids) == text

"""The synthetic models the GPU bench builds, and the bench itself as a dry run on the CPU."""

from __future__ import annotations

import json

import mlx.core as mx

from node.bench import gpu_restore, synthetic


def test_gemma3_12b_shape_is_gemma3_12b():
    shape = synthetic.SHAPES["gemma3-12b"]
    assert (shape["num_hidden_layers"], shape["hidden_size"], shape["intermediate_size"]) == (48, 3840, 15360)
    assert (shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]) == (16, 8, 256)
    assert (shape["sliding_window"], shape["sliding_window_pattern"], shape["vocab_size"]) == (
        1024,
        6,
        262144,
    )


def test_tiny_builds_in_bf16_and_4_bit():
    model = synthetic.build("tiny")
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 512)
    quantized = synthetic.build("tiny", bits=4)
    assert synthetic.parameter_bytes(quantized) < synthetic.parameter_bytes(model)


def test_gpu_bench_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    gpu_restore.main(
        ["--synthetic", "tiny", "--contexts", "64,256", "--decode-context", "64", "--bits", "0", "--int8", "0",
         "--json", str(out), "--work-dir", str(tmp_path / "work")]
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert [r["tokens"] for r in result["restore"]] == [64, 256]
    assert result["landings_agree"] == {"staging": True}  # pinned and mapped need CUDA
    assert result["landing"] in ("copy", "staging") and result["node_landing"] == "staging"
    assert {r["agents"] for r in result["decode"]} == {1, 3, 8}
    assert all(r["device_cache_dtype"] == "mlx.core.bfloat16" for r in result["restore"])

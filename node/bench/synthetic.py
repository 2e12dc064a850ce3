"""Models with random weights in a real architecture's shape, built on the machine (no download).

Speed measurements only: prefill, decode, KV size and restore cost depend on the shapes, not on the
weights' values. `gemma3-12b` is Gemma 3 12B's text model (mlx-lm `gemma3_text`: 48 layers, hidden
3840, 16 query / 8 KV heads of 256, FFN 15360, vocab 262144, 1024-token sliding window on five layers
of every six); `tiny` is a two-layer model of the same family for dry runs on a CPU.
"""

from __future__ import annotations

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import gemma3_text

SHAPES: dict[str, dict] = {
    "gemma3-12b": {
        "hidden_size": 3840,
        "num_hidden_layers": 48,
        "intermediate_size": 15360,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 256,
        "vocab_size": 262144,
        "sliding_window": 1024,
        "sliding_window_pattern": 6,
        "query_pre_attn_scalar": 256,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "max_position_embeddings": 131072,
    },
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 6,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 512,
        "sliding_window": 32,
        "sliding_window_pattern": 6,
        "query_pre_attn_scalar": 16,
        "max_position_embeddings": 131072,
    },
}


def build(name: str, dtype: mx.Dtype = mx.bfloat16, bits: int | None = None, seed: int = 0) -> nn.Module:
    """The named shape with random weights of `dtype` (norms near 0: mlx-lm's Gemma RMSNorm adds 1),
    quantized to `bits` (4 or 8, group 64) when given. Weights are made on the default device."""
    args = gemma3_text.ModelArgs(model_type="gemma3_text", **SHAPES[name])
    model = gemma3_text.Model(args)
    mx.random.seed(seed)
    weights = []
    for key, value in tree_flatten(model.parameters()):
        scale = 0.02 if value.ndim > 1 else 0.0
        weights.append((key, (mx.random.normal(value.shape) * scale).astype(dtype)))
        mx.eval(weights[-1][1])  # one tensor at a time: never two copies of a 24 GB model
    model.update(tree_unflatten(weights))
    if bits is not None:
        nn.quantize(model, group_size=64, bits=bits)
    mx.eval(model.parameters())
    return model


def parameter_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))

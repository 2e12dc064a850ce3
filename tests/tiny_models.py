"""Tiny random-weight Gemma 3 and Llama models written as GGUF with llama.cpp's own writer.

The Gemma has six layers so both layer kinds exist (five sliding, one global), and a sliding
window of 8 tokens so that tests can run past the window in a few dozen tokens.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, WINDOW = 32, 6, 2, 1, 16, 64, 8
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "and", "a", "is", "of", "to", "in"]
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    tokens = list(SPECIALS) + [f"<0x{b:02X}>" for b in range(256)]
    types = [3] * len(SPECIALS) + [6] * 256
    tokens += ["\u2581"] + [f"\u2581{w}" for w in WORDS] + list("abcdefghijklmnopqrstuvwxyz")
    types += [1] * (1 + len(WORDS) + 26)
    scores = [0.0] * len(SPECIALS) + [-1000.0] * 256 + [-float(i) for i in range(1 + len(WORDS) + 26)]
    return tokens, scores, types


def tiny_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Weights in mlx-lm naming (norms without llama.cpp's +1)."""
    rng = np.random.default_rng(seed)
    vocab = len(vocabulary()[0])

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    weights = {"model.embed_tokens.weight": w(vocab, HIDDEN), "model.norm.weight": w(HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        weights |= {
            p + "self_attn.q_proj.weight": w(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": w(HIDDEN, HEADS * HEAD_DIM),
            p + "self_attn.q_norm.weight": w(HEAD_DIM),
            p + "self_attn.k_norm.weight": w(HEAD_DIM),
            p + "input_layernorm.weight": w(HIDDEN),
            p + "post_attention_layernorm.weight": w(HIDDEN),
            p + "pre_feedforward_layernorm.weight": w(HIDDEN),
            p + "post_feedforward_layernorm.weight": w(HIDDEN),
            p + "mlp.gate_proj.weight": w(FFN, HIDDEN),
            p + "mlp.up_proj.weight": w(FFN, HIDDEN),
            p + "mlp.down_proj.weight": w(HIDDEN, FFN),
        }
    return weights


_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    layer, rest = name.removeprefix("model.layers.").split(".", 1)
    return f"blk.{layer}.{_TO_GGUF[rest.removesuffix('.weight')]}.weight"


def _start(path: Path, architecture: str, heads: int, kv_heads: int) -> gguf.GGUFWriter:
    """Writer with the shape metadata and the tokenizer both tiny models share."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(LAYERS)
    writer.add_context_length(32768)  # room for the skills' playbooks in its byte-level vocabulary
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    tokens, scores, types = vocabulary()
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    return writer


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_tiny_gguf(
    path: Path, seed: int = 0, quantize: tuple[str, ...] = ("mlp.up_proj",), chat_template: str | None = None
) -> dict[str, np.ndarray]:
    """Write the Gemma GGUF; return the weights the import must reproduce (Q8_0 within tolerance).

    Without `chat_template` it is a base model, like the embedded default; with one, an
    instruction-tuned model."""
    writer = _start(path, "gemma3", HEADS, KV_HEADS)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_sliding_window(WINDOW)
    weights = tiny_weights(seed)
    for name, array in weights.items():
        stored = array + 1.0 if name.endswith("norm.weight") else array
        if any(q in name for q in quantize):
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), stored)
    _finish(writer)
    return weights


LLAMA_HEADS, LLAMA_KV_HEADS = 4, 2


def _rope_permute(array: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `permute` of Q/K rows (the import must undo it)."""
    return (
        array.reshape(heads, 2, array.shape[0] // heads // 2, *array.shape[1:])
        .swapaxes(1, 2)
        .reshape(array.shape)
    )


def write_tiny_llama_gguf(path: Path, seed: int = 1) -> dict[str, np.ndarray]:
    """A 6-layer Llama with grouped-query attention and its own output matrix, all F32."""
    rng = np.random.default_rng(seed)
    vocab = len(vocabulary()[0])
    head_dim = HIDDEN // LLAMA_HEADS

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    weights = {"model.embed_tokens.weight": w(vocab, HIDDEN), "model.norm.weight": 1 + w(HIDDEN)}
    weights["lm_head.weight"] = w(vocab, HIDDEN)
    gguf_names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    gguf_names["lm_head.weight"] = "output.weight"
    layer_names = {
        "self_attn.q_proj": ("attn_q", (LLAMA_HEADS * head_dim, HIDDEN)),
        "self_attn.k_proj": ("attn_k", (LLAMA_KV_HEADS * head_dim, HIDDEN)),
        "self_attn.v_proj": ("attn_v", (LLAMA_KV_HEADS * head_dim, HIDDEN)),
        "self_attn.o_proj": ("attn_output", (HIDDEN, LLAMA_HEADS * head_dim)),
        "input_layernorm": ("attn_norm", (HIDDEN,)),
        "post_attention_layernorm": ("ffn_norm", (HIDDEN,)),
        "mlp.gate_proj": ("ffn_gate", (FFN, HIDDEN)),
        "mlp.up_proj": ("ffn_up", (FFN, HIDDEN)),
        "mlp.down_proj": ("ffn_down", (HIDDEN, FFN)),
    }
    for i in range(LAYERS):
        for name, (short, shape) in layer_names.items():
            weights[f"model.layers.{i}.{name}.weight"] = w(*shape) + (1.0 if len(shape) == 1 else 0.0)
            gguf_names[f"model.layers.{i}.{name}.weight"] = f"blk.{i}.{short}.weight"
    writer = _start(path, "llama", LLAMA_HEADS, LLAMA_KV_HEADS)
    writer.add_rope_freq_base(10_000.0)
    for name, array in weights.items():
        if name.endswith("q_proj.weight"):
            array = _rope_permute(array, LLAMA_HEADS)
        elif name.endswith("k_proj.weight"):
            array = _rope_permute(array, LLAMA_KV_HEADS)
        writer.add_tensor(gguf_names[name], array)
    _finish(writer)
    return weights

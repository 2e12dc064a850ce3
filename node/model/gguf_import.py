"""Convert a GGUF file into an mlx-lm model folder (config.json, safetensors, tokenizer).

llama.cpp's reader (`gguf`) dequantizes every tensor to numpy; names and shapes are mapped onto
mlx-lm's own model classes, so the runtime never needs a model implementation of its own. The
conversion takes tens of seconds the first time, so the result is cached under the user's cache
directory and reused by every later start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from node.errors import ModelImportError
from node.model.first_start import ensure_folder, file_digest

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
SUPPORTED_ARCHITECTURES = ("gemma3", "llama")
CONVERTER_VERSION = 2  # 2: no borrowed chat template for base models
GGUF_MAGIC = b"GGUF"
SOURCE_MARKER = "node_source.json"  # written last: a converted folder is complete iff it holds this


@dataclass(frozen=True)
class ArchitectureMapping:
    config: Callable[[dict], dict]
    tensor_name: Callable[[str], str | None]
    transform: Callable[[str, np.ndarray, dict], np.ndarray]


def _field(fields: dict, key: str, default=None):
    field = fields.get(key)
    if field is None:
        return default
    return field.contents()


def _gemma3_config(meta: dict) -> dict:
    head_dim = meta["attention.key_length"]
    config = {
        "model_type": "gemma3_text",
        "hidden_size": meta["embedding_length"],
        "num_hidden_layers": meta["block_count"],
        "intermediate_size": meta["feed_forward_length"],
        "num_attention_heads": meta["attention.head_count"],
        "num_key_value_heads": meta["attention.head_count_kv"],
        "head_dim": head_dim,
        "rms_norm_eps": meta["attention.layer_norm_rms_epsilon"],
        "rope_theta": meta.get("rope.freq_base", 1_000_000.0),
        "rope_local_base_freq": 10_000.0,
        "query_pre_attn_scalar": head_dim,
        "sliding_window": meta.get("attention.sliding_window", 512),
        "sliding_window_pattern": 6,
        "max_position_embeddings": meta.get("context_length", 32768),
    }
    if "rope.scaling.factor" in meta:
        config["rope_scaling"] = {"rope_type": "linear", "factor": meta["rope.scaling.factor"]}
    return config


def _llama_config(meta: dict) -> dict:
    heads = meta["attention.head_count"]
    return {
        "model_type": "llama",
        "hidden_size": meta["embedding_length"],
        "num_hidden_layers": meta["block_count"],
        "intermediate_size": meta["feed_forward_length"],
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get("attention.head_count_kv", heads),
        "head_dim": meta.get("attention.key_length", meta["embedding_length"] // heads),
        "rms_norm_eps": meta["attention.layer_norm_rms_epsilon"],
        "rope_theta": meta.get("rope.freq_base", 10_000.0),
        "max_position_embeddings": meta.get("context_length", 4096),
        "tie_word_embeddings": False,
    }


_COMMON_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA3_NAMES = {
    **_COMMON_NAMES,
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_LLAMA_NAMES = {**_COMMON_NAMES, "ffn_norm": "post_attention_layernorm"}
_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def _name_mapper(names: dict[str, str]) -> Callable[[str], str | None]:
    def map_name(gguf_name: str) -> str | None:
        if gguf_name in _TOP_LEVEL:
            return _TOP_LEVEL[gguf_name]
        match = _BLOCK.match(gguf_name)
        if match and match.group(2) in names:
            return f"model.layers.{match.group(1)}.{names[match.group(2)]}.weight"
        return None

    return map_name


def _gemma3_transform(name: str, array: np.ndarray, config: dict) -> np.ndarray:
    # llama.cpp folds Gemma's "1 +" into RMSNorm weights; mlx-lm's RMSNorm adds it itself.
    if name.endswith("norm.weight"):
        return array - 1.0
    return array


def _unpermute_rope(array: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of Q/K rows for its rope layout."""
    rows = array.shape[0]
    return array.reshape(heads, rows // heads // 2, 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)


def _llama_transform(name: str, array: np.ndarray, config: dict) -> np.ndarray:
    if name.endswith("q_proj.weight"):
        return _unpermute_rope(array, config["num_attention_heads"])
    if name.endswith("k_proj.weight"):
        return _unpermute_rope(array, config["num_key_value_heads"])
    return array


ARCHITECTURES = {
    "gemma3": ArchitectureMapping(_gemma3_config, _name_mapper(_GEMMA3_NAMES), _gemma3_transform),
    "llama": ArchitectureMapping(_llama_config, _name_mapper(_LLAMA_NAMES), _llama_transform),
}


def check_gguf_header(path: Path) -> None:
    with path.open("rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise ModelImportError(f"{path} is not a GGUF file (no GGUF magic bytes)")


def _string_array(field) -> list[str]:
    return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]


def _architecture_metadata(fields: dict, arch: str) -> dict:
    prefix = f"{arch}."
    return {k[len(prefix) :]: _field(fields, k) for k in fields if k.startswith(prefix)}


def _tokenizer_dict(fields: dict) -> dict:
    prefix = "tokenizer.ggml."
    result: dict = {}
    for key, field in fields.items():
        if not key.startswith(prefix):
            continue
        short = key[len(prefix) :]
        if short in ("tokens", "merges"):
            result[short] = _string_array(field)
        elif short in ("scores", "token_type"):
            result[short] = [field.parts[i][0].item() for i in field.data]
        else:
            result[short] = field.contents()
    result["tokenizer_type"] = result.pop("model", "llama")
    return result


def _write_tokenizer(fields: dict, arch: str, folder: Path) -> None:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    info = _tokenizer_dict(fields)
    tokenizer, _ = convert_gguf_tokenizer(arch, info)
    tokenizer.save(str(folder / "tokenizer.json"))
    tokens = info["tokens"]

    def token(key: str) -> str | None:
        index = info.get(f"{key}_token_id")
        return tokens[index] if index is not None and index < len(tokens) else None

    # A GGUF without a chat template is a base model: it gets none (node.model.prompt_format).
    template = _field(fields, "tokenizer.chat_template")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": bool(info.get("add_bos_token", True)),
        "chat_template": template,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def _dequantize(tensor) -> np.ndarray:
    from gguf.quants import dequantize

    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    return dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)


def _write_weights(
    reader, mapping: ArchitectureMapping, config: dict, folder: Path, progress: Progress
) -> None:
    from safetensors.numpy import save_file

    weights: dict[str, np.ndarray] = {}
    total = len(reader.tensors)
    for index, tensor in enumerate(reader.tensors, start=1):
        name = mapping.tensor_name(tensor.name)
        if name is None:
            logger.debug("skipping GGUF tensor %s", tensor.name)
            continue
        weights[name] = mapping.transform(name, _dequantize(tensor), config)
        if index % 24 == 0 or index == total:
            progress(f"dequantized {index}/{total} tensors")
    if "lm_head.weight" not in weights and config["model_type"] == "llama":
        config["tie_word_embeddings"] = True
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "mlx"})


def convert_gguf(path: Path, folder: Path, progress: Progress) -> None:
    """Write the mlx-lm folder for `path` into `folder` (which must exist and be empty)."""
    from gguf import GGUFReader

    check_gguf_header(path)
    progress(f"reading {path.name}")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises bare ValueError/struct errors on bad input
        raise ModelImportError(f"cannot read GGUF file {path}: {e}") from e
    arch = _field(reader.fields, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelImportError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    mapping = ARCHITECTURES[arch]
    meta = _architecture_metadata(reader.fields, arch)
    config = mapping.config(meta)
    config["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    progress("building the tokenizer")
    _write_tokenizer(reader.fields, arch, folder)
    progress("dequantizing weights to fp32")
    _write_weights(reader, mapping, config, folder, progress)
    (folder / "config.json").write_text(json.dumps(config, indent=1))


def conversion_folder(path: Path, cache_root: Path) -> Path:
    """Where the conversion of `path` is cached: keyed by its path, size, mtime and the converter."""
    path = path.resolve()
    stat = path.stat()
    key = hashlib.sha256(
        f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{CONVERTER_VERSION}".encode()
    ).hexdigest()[:16]
    return cache_root / f"{path.stem}-{key}"


def converted_folder(path: Path, cache_root: Path, progress: Progress) -> Path:
    """Return the cached conversion of `path`, converting it first when needed.

    One process converts (under the folder's lock, into a staging folder renamed into place);
    others wait and say so. The folder is complete iff it holds `SOURCE_MARKER`, written last.
    """
    path = path.resolve()
    folder = conversion_folder(path, cache_root)

    def build(staging: Path) -> None:
        started = time.perf_counter()
        progress(f"converting {path} (first start only; cached in {folder})")
        convert_gguf(path, staging, progress)
        source = {"gguf": str(path), "sha256": file_digest(path), "converter": CONVERTER_VERSION}
        (staging / SOURCE_MARKER).write_text(json.dumps(source, indent=1))
        progress(f"converted in {time.perf_counter() - started:.1f} s")

    return ensure_folder(folder, build, SOURCE_MARKER, f"convert {path.name}", progress)

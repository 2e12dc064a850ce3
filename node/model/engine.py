"""The loaded model: weights, tokenizer, prompt format and a fingerprint of what defines its KV.

A model with a chat template (in its GGUF or tokenizer config) is instruction-tuned and renders
conversations with it; one without is a base model and renders them as a plain document
(`node.model.prompt_format`).

On the CPU backend weights are loaded in fp32 (only fp32 matmul goes through BLAS there; MLX's bf16
and quantized matmuls are 4-1000x slower), then its linear layers and embeddings become int8 computed
by node's own kernel (`node.model.int8_weights`; NODE_INT8_WEIGHTS=0 keeps fp32), and the model runs
through `node.model.cpu_kernels` (set NODE_CPU_KERNELS=0 to keep MLX's own); on Metal and CUDA the
model keeps its own dtype and kernels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_map
from mlx_lm.utils import dequantize_model, load_model

from node.config import switch_on
from node.errors import ModelSpecError
from node.heap import freeze_long_lived
from node.model import blas, cpu_kernels, int8_weights, kv_cache
from node.model.kv_cache import make_caches
from node.model.prompt_format import prompt_format
from node.model.spec import resolve_model_folder
from node.model.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

# Tokens that end an assistant turn in chat templates, beyond the tokenizer's own EOS.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    folder: str
    fingerprint: str
    backend: str
    dtype: str
    load_s: float
    instruction_tuned: bool = False
    kernels: list[str] = dataclasses.field(default_factory=list)


def _safetensors_header(path: Path) -> bytes:
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return handle.read(length)


def model_fingerprint(folder: Path) -> str:
    """Digest of what defines the model's KV: config, weight layout and source, tokenizer."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(_safetensors_header(path))
    for name in ("node_source.json", "tokenizer.json", "tokenizer.model"):
        if (folder / name).exists():
            digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:32]


def backend() -> str:
    return "gpu" if mx.default_device() == mx.gpu else "cpu"


def _prepare_for_backend(model: nn.Module) -> str:
    if backend() != "cpu":
        return str(next(iter(dict(_float_leaves(model)).values())).dtype)
    if any(isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding) for _, m in model.named_modules()):
        model = dequantize_model(model)
    model.update(
        tree_map(
            lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters()
        )
    )
    return "float32"


def _kernels(model: nn.Module) -> list[str]:
    """What runs the model beyond MLX's defaults (CPU only: fast BLAS paths and cpu_kernels)."""
    if backend() != "cpu":
        return []
    kernels = []
    if blas.thin_calls() is not None:
        kernels.append("cblas_sgemm: thin products (decode) as sgemv / few-row kernel")
    if switch_on("INT8_WEIGHTS") and (replaced := int8_weights.quantize_model(model)):
        kernels.append(f"int8 weights ({replaced} linear/embedding layers): {int8_weights.describe()}")
    if switch_on("CPU_KERNELS"):
        kernels += cpu_kernels.install(model)
    return kernels


def _float_leaves(model: nn.Module):
    from mlx.utils import tree_flatten

    return [(k, v) for k, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]


class Engine:
    """A model, its tokenizer and the helpers that turn text into token ids and back."""

    def __init__(self, model: nn.Module, tokenizer, info: ModelInfo) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_ids = self._stop_token_ids(tokenizer)
        self.prompt_format = prompt_format(tokenizer, info.instruction_tuned)

    @classmethod
    def load(
        cls,
        spec: str = "default",
        progress: Callable[[str], None] = logger.info,
        cache_root: Path | None = None,
    ) -> Engine:
        started = time.perf_counter()
        folder = resolve_model_folder(spec, progress, cache_root)
        try:
            with ThreadPoolExecutor(1) as pool:  # the vocabulary parses while the weights load
                tokenizer = pool.submit(TextTokenizer, folder)
                model, _ = load_model(folder, lazy=False)
                tokenizer = tokenizer.result()
        except ModelSpecError:
            raise
        except Exception as e:
            raise ModelSpecError(f"cannot load the model in {folder}: {e}") from e
        dtype = _prepare_for_backend(model)
        mx.eval(model.parameters())
        kernels = _kernels(model)
        info = ModelInfo(
            name=spec if spec != "default" else "gemma-3-270m (default, GGUF Q4_K_M)",
            folder=str(folder),
            fingerprint=model_fingerprint(folder),
            backend=backend(),
            dtype=dtype,
            load_s=time.perf_counter() - started,
            instruction_tuned=bool(tokenizer.chat_template),
            kernels=kernels,
        )
        engine = cls(model, tokenizer, info)
        freeze_long_lived()  # the libraries' and the model's objects (`node.heap`)
        return engine

    @staticmethod
    def _stop_token_ids(tokenizer: TextTokenizer) -> frozenset[int]:
        ids = {tokenizer.eos_token_id, *tokenizer.extra_eos_ids}
        ids.update(tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS)
        return frozenset(i for i in ids if i is not None)

    @property
    def context_limit(self) -> int:
        return int(getattr(self.model.args, "max_position_embeddings", 0) or 1 << 20)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text)
        if add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the model was trained to read it (template or document)."""
        return self.prompt_format.render(messages, add_generation_prompt)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt)
        return self.encode(text, add_bos=self.prompt_format.add_bos)

    @property
    def chat_stop(self) -> tuple[str, ...]:
        """Stop strings that end a reply in this model's prompt format (beyond its stop tokens)."""
        return self.prompt_format.stop

    def make_caches(self) -> list:
        return make_caches(self.model)

    @property
    def kv_values_per_position(self) -> int:
        """How many numbers K and V hold for one position of one layer."""
        args = self.model.args
        heads = getattr(args, "num_key_value_heads", None) or args.num_attention_heads
        dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
        return 2 * heads * dim

    @property
    def kv_position_bytes(self) -> int:
        """Bytes of K and V for one position of one layer, in the model's dtype."""
        return self.kv_values_per_position * (2 if self.info.dtype in ("float16", "bfloat16") else 4)

    def kv_memory_bytes(self, tokens: int) -> int:
        """Bytes the KV caches of one context of `tokens` positions hold in memory (sliding-window
        layers keep about a window)."""
        return sum(
            self.kv_position_bytes * kv_cache.resident_positions(c, tokens) for c in self.make_caches()
        )

    def describe(self) -> dict:
        return dataclasses.asdict(self.info)

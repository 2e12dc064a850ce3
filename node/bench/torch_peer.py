"""PyTorch + transformers prefill of the same synthetic shape: the GPU peer for `gpu_restore`.

Runs under the machine's own Python with torch (the node does not depend on torch), so it imports
nothing from the node. One forward pass per context (sdpa attention, bf16, random weights, logits of
the last position only), each size timed twice after a warm-up; prints and writes JSON.

    python -m node.bench.torch_peer --synthetic gemma3-12b --contexts 2048,8192 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

SHAPES = {
    "gemma3-12b": {
        "hidden_size": 3840,
        "num_hidden_layers": 48,
        "intermediate_size": 15360,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 256,
        "vocab_size": 262144,
        "sliding_window": 1024,
        "query_pre_attn_scalar": 256,
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
        "query_pre_attn_scalar": 16,
    },
}


def build(name: str, device: str):
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    shape = SHAPES[name]
    layers = shape["num_hidden_layers"]
    config = Gemma3TextConfig(
        **shape,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
        max_position_embeddings=131072,
        attn_implementation="sdpa",
    )
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = Gemma3ForCausalLM(config)
    model.eval()
    return model


def prefill_s(model, tokens: int, device: str) -> float:
    import torch

    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        out.logits.argmax(-1).item()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    import torch
    import transformers

    parser = argparse.ArgumentParser()
    parser.add_argument("--synthetic", default="gemma3-12b", choices=sorted(SHAPES))
    parser.add_argument("--contexts", default="2048,8192,20480,32768")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    model = build(args.synthetic, device)
    built_s = time.perf_counter() - started
    contexts = [int(c) for c in args.contexts.split(",")]
    prefill_s(model, min(contexts), device)  # warm-up
    rows = []
    for n in contexts:
        times = [prefill_s(model, n, device) for _ in range(2)]
        rows.append(
            {
                "tokens": n,
                "prefill_s": round(min(times), 4),
                "tok_s": round(n / min(times), 1),
                "runs_s": times,
            }
        )
        print(f"torch prefill {n:>6} tokens: {min(times):.3f} s ({n / min(times):,.0f} tok/s)", flush=True)
    result = {
        "peer": "pytorch+transformers",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "attention": "sdpa",
        "dtype": "bfloat16",
        "synthetic": args.synthetic,
        "build_s": round(built_s, 2),
        "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Subprocess side of the llama.cpp peer (scenario 5), through llama-cpp-python's C API.

    python -m node.bench.llama_worker build   --gguf F --contexts JSON --state-dir D --decode N
    python -m node.bench.llama_worker restore --gguf F --contexts JSON --state-dir D --decode N

`build` prefills each context cold (time to first token, as ours is measured), saves llama.cpp's
own state file (`llama_state_save_file`: KV cache, logits, token ids), and decodes N tokens.
`restore`, in a fresh process, times `llama_state_load_file` for each context, then feeds the
first generated token and decodes N tokens. Prints one JSON object. Runs in its own process so that
ggml and MLX never share one.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path

BATCH = 512


class Peer:
    def __init__(self, gguf: str, n_ctx: int, threads: int) -> None:
        import llama_cpp as lib

        self.lib = lib
        started = time.perf_counter()
        lib.llama_backend_init()
        self.model = lib.llama_model_load_from_file(gguf.encode(), lib.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp cannot load {gguf}")
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, BATCH, BATCH
        params.n_threads = params.n_threads_batch = threads
        self.ctx = lib.llama_init_from_model(self.model, params)
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.load_s = time.perf_counter() - started

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def feed(self, tokens: list[int]) -> int:
        """Decode `tokens` after what the context holds; return the greedy next token."""
        import numpy as np

        for start in range(0, len(tokens), BATCH):
            chunk = tokens[start : start + BATCH]
            array = (self.lib.llama_token * len(chunk))(*chunk)
            if self.lib.llama_decode(self.ctx, self.lib.llama_batch_get_one(array, len(chunk))) != 0:
                raise RuntimeError("llama_decode failed")
        logits = self.lib.llama_get_logits_ith(self.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def decode(self, first: int, count: int) -> tuple[float, float | None]:
        """Feed `first`, then greedy-decode; (time to the first new token, tokens/s after it)."""
        started = time.perf_counter()
        token = self.feed([first])
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(count - 1):
            token = self.feed([token])
        seconds = time.perf_counter() - started
        return first_s, (round((count - 1) / seconds, 3) if count > 1 and seconds > 0 else None)

    def save(self, path: Path, tokens: list[int]) -> float:
        started = time.perf_counter()
        array = (self.lib.llama_token * len(tokens))(*tokens)
        if not self.lib.llama_state_save_file(self.ctx, str(path).encode(), array, len(tokens)):
            raise RuntimeError(f"llama_state_save_file({path}) failed")
        return time.perf_counter() - started

    def load(self, path: Path, capacity: int) -> tuple[float, int]:
        started = time.perf_counter()
        tokens, count = (self.lib.llama_token * capacity)(), ctypes.c_size_t(0)
        if not self.lib.llama_state_load_file(
            self.ctx, str(path).encode(), tokens, capacity, ctypes.byref(count)
        ):
            raise RuntimeError(f"llama_state_load_file({path}) failed")
        return time.perf_counter() - started, count.value


def build(peer: Peer, contexts: list[dict], state_dir: Path, decode: int) -> list[dict]:
    rows = []
    for context in contexts:
        ids, path = context["ids"], state_dir / f"ctx-{context['tokens']}.state"
        peer.clear()
        started = time.perf_counter()
        first = peer.feed(ids)
        prefill_s = time.perf_counter() - started
        save_s = peer.save(path, ids)
        _, decode_tok_s = peer.decode(first, decode)
        rows.append(
            {
                "tokens": len(ids),
                "prefill_s": round(prefill_s, 4),
                "save_s": round(save_s, 5),
                "state_bytes": path.stat().st_size,
                "first_token": first,
                "decode_tok_s": decode_tok_s,
            }
        )
    return rows


def restore(peer: Peer, contexts: list[dict], state_dir: Path, decode: int, firsts: dict) -> list[dict]:
    rows = []
    for context in contexts:
        peer.clear()
        restore_s, count = peer.load(state_dir / f"ctx-{context['tokens']}.state", context["tokens"] + 16)
        first_s, decode_tok_s = peer.decode(firsts[str(context["tokens"])], decode)
        rows.append(
            {
                "tokens": count,
                "restore_s": round(restore_s, 5),
                "first_token_s": round(first_s, 4),
                "decode_tok_s": decode_tok_s,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.bench.llama_worker")
    parser.add_argument("command", choices=("build", "restore"))
    parser.add_argument("--gguf", required=True)
    parser.add_argument(
        "--contexts", required=True, help="JSON file: {'contexts': [{'tokens', 'ids'}], 'first_tokens'?}"
    )
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.contexts).read_text())
    contexts, state_dir = spec["contexts"], Path(args.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    peer = Peer(args.gguf, max(c["tokens"] for c in contexts) + args.decode + 64, args.threads)
    if args.command == "build":
        rows = build(peer, contexts, state_dir, args.decode)
    else:
        rows = restore(peer, contexts, state_dir, args.decode, spec["first_tokens"])
    print(
        json.dumps({"load_s": round(peer.load_s, 3), "threads": args.threads, "contexts": rows}), flush=True
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

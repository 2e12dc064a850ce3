"""Restore vs recompute on a GPU, at a real model's size: `bench --synthetic gemma3-12b`.

One run, one process, one model (random weights in `node.bench.synthetic`'s shape, built on the
machine), at each context size:

- prefill from nothing (the node's rewindable caches, chunks of `CHUNK`), twice: first and best;
- the node's checkpoint of the largest context (`CheckpointStore.save`: seconds, bytes per token),
  and of the smallest;
- the node's restore at each size from that checkpoint (a prompt sharing that many tokens):
  `CheckpointStore.restore` (the store's own path) and `node.memory.device_restore` (parallel reads,
  storage dtype straight to the device, layers overlapped), each from the page cache and cold;
- what `node.memory.cost_model` (calibrated on the two smallest sizes) picks, and the time of
  the pick, against prefill;
- time to first token after a restore (restore + a new 64-token message + the first token);
- mlx-lm's own `save_prompt_cache` / `load_prompt_cache` of the same context, as the peer;
- decode for 1, 3 and 8 agents restored from the checkpoint, batched (`node.runtime.batching`);
- the same model quantized to 4 bits: prefill and decode.

Cold reads: the page cache is dropped (`/proc/sys/vm/drop_caches`, root) before each; where that
is refused, `posix_fadvise(DONTNEED)` on every file read approximates it; the JSON says which.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHUNK = 2048
SUFFIX = 64
DECODE_STEPS = 32
AGENT_COUNTS = (1, 3, 8)


def _log(message: str) -> None:
    print(message, flush=True)


def drop_page_cache(paths: list[Path]) -> str:
    """Evict `paths` from the page cache; returns how ('drop_caches' or 'fadvise')."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


class Harness:
    """The model, its caches and timers, on MLX's default device."""

    def __init__(self, name: str, bits: int | None = None) -> None:
        import mlx.core as mx

        from node.bench import synthetic

        started = time.perf_counter()
        self.mx = mx
        self.model = synthetic.build(name, bits=bits)
        self.dtype = mx.bfloat16
        self.build_s = time.perf_counter() - started
        self.vocab = self.model.args.vocab_size
        self.parameter_bytes = synthetic.parameter_bytes(self.model)

    def make_caches(self):
        from node.model import kv_cache

        return kv_cache.make_caches(self.model)

    def tokens(self, n: int, seed: int) -> list[int]:
        import numpy as np

        return np.random.default_rng(seed).integers(2, self.vocab, n).tolist()

    def feed(self, caches, tokens: list[int], logits: bool = False):
        mx = self.mx
        out = None
        for start in range(0, len(tokens), CHUNK):
            out = self.model(mx.array(tokens[start : start + CHUNK])[None], cache=caches)
            last = start + CHUNK >= len(tokens)
            if last and logits:
                token = mx.argmax(out[0, -1])
                mx.eval(token, [c.keys for c in caches])
                return token.item()
            mx.eval([c.keys for c in caches] + [c.values for c in caches])
        return None

    def prefill(self, tokens: list[int]) -> tuple[float, list]:
        """Seconds to prefill `tokens` from nothing and produce the first token; the caches."""
        caches = self.make_caches()
        self.mx.synchronize()
        started = time.perf_counter()
        self.feed(caches, tokens, logits=True)
        return time.perf_counter() - started, caches

    def free(self) -> None:
        self.mx.clear_cache()


def _store(root: Path, storage: str):
    from node.memory.checkpoint import CheckpointStore

    try:
        return CheckpointStore(root, "synthetic", storage=storage)
    except TypeError:  # a store without a storage choice
        return CheckpointStore(root, "synthetic")


def checkpoint_cost(h: Harness, root: Path, agent: str, tokens: list[int], caches, storage: str) -> dict:
    store = _store(root, storage)
    seconds = store.save(agent, tokens, caches, 0, {"bench": True})
    nbytes = store.bytes_on_disk(agent)
    return {
        "tokens": len(tokens),
        "save_s": round(seconds, 3),
        "bytes_on_disk": nbytes,
        "bytes_per_token_on_disk": round(nbytes / len(tokens)),
        "storage": storage,
    }


def _node_restore(store, agent, h, n):
    result = store.restore(agent, h.make_caches, lambda t: n)
    dtype = str(result.caches[0].keys.dtype)
    return result.seconds, dtype, result.caches


def _device_restore(store, agent, h, n, verify=True, landing="copy"):
    from node.memory import device_restore

    result = device_restore.restore(
        store, agent, h.make_caches, h.dtype, lambda t: n, verify=verify, landing=landing
    )
    return result.seconds, result.phases, result.caches


def _landing(name: str):
    def run(store, agent, h, n):
        return _device_restore(store, agent, h, n, landing=name)

    return run


def device_landings() -> tuple[str, ...]:
    """The landings this machine can run (pinned and mapped need CUDA's runtime)."""
    from node.memory import cuda_transfer, device_restore

    return device_restore.LANDINGS if cuda_transfer.available() else ("copy", "staging")


RESTORES = (
    ("node", _node_restore),
    *((name, _landing(name)) for name in ("copy", "staging", "mapped", "pinned")),
)


def restore_rows(h: Harness, store, agent: str, n: int, root: Path, labels: tuple[str, ...]) -> dict:
    """The store's restore (warm once: it is slow) and the device restores of `labels` (warm: best
    of 3) at `n` tokens, then each cold."""
    row: dict = {"tokens": n}
    for label, run in RESTORES:
        if label not in labels:
            continue
        warm = []
        forget_headers()  # the first warm restore parses the block headers, later ones reuse them
        for _ in range(1 if label == "node" else 3):
            seconds, extra, caches = run(store, agent, h, n)
            if label != "node" and seconds <= min(warm, default=seconds):
                row[f"{label}_warm_plan_s"] = round(extra.plan_s, 4)
                row[f"{label}_warm_read_wait_s"] = round(extra.read_wait_s, 4)
                row[f"{label}_warm_device_wait_s"] = round(extra.extra.get("device_wait_s", 0), 4)
            warm.append(seconds)
            del caches
            h.free()
        row[f"{label}_warm_s"] = round(min(warm), 4)
        if label != "node":
            row[f"{label}_warm_first_s"] = round(warm[0], 4)
        row["cold_method"] = drop_page_cache(files_under(root))
        forget_headers()  # as a fresh process: nothing parsed, nothing in the page cache
        seconds, extra, caches = run(store, agent, h, n)
        row[f"{label}_cold_s"] = round(seconds, 4)
        if label == "node":
            row["node_cache_dtype"] = extra
        else:
            row["device_bytes_read"] = extra.bytes_read
            row[f"{label}_cold_read_wait_s"] = round(extra.read_wait_s, 4)
            row["kv_bytes"] = sum(c.keys.nbytes + c.values.nbytes for c in caches)
            row["device_cache_dtype"] = str(caches[0].keys.dtype)
        del caches
        h.free()
    fastest = min((label for label in labels if label != "node"), key=lambda label: row[f"{label}_warm_s"])
    seconds, _, caches = _device_restore(store, agent, h, n, verify=False, landing=fastest)
    row[f"{fastest}_warm_noverify_s"] = round(seconds, 4)
    del caches
    h.free()
    return row


def forget_headers() -> None:
    from node.memory import device_restore

    device_restore.HEADERS.clear()


def landings_agree(h: Harness, store, agent: str, n: int, landings: tuple[str, ...]) -> dict[str, bool]:
    """Each landing restores exactly what the copy landing does (checked on this device), also
    when its slots are reused for a shorter restore."""
    mx = h.mx
    _, _, reference = _device_restore(store, agent, h, n, landing="copy")
    _, _, half = _device_restore(store, agent, h, n // 2, landing="copy")
    agree = {}
    for landing in landings:
        if landing == "copy":
            continue
        try:
            _, _, a = _device_restore(store, agent, h, n, landing=landing)
            _, _, b = _device_restore(store, agent, h, n // 2, landing=landing)  # reuses the slots
        except Exception as e:  # noqa: BLE001 - a landing this machine cannot run is reported, not fatal
            _log(f"landing {landing} failed: {type(e).__name__}: {e}")
            agree[landing] = False
            continue
        agree[landing] = all(
            mx.array_equal(x.keys, y.keys).item() and mx.array_equal(x.values, y.values).item()
            for pair in ((a, reference), (b, half))
            for x, y in zip(*pair)
        )
        del a, b
        h.free()
    del reference, half
    h.free()
    return agree


def _headline(row: dict, prefill_s: float, landing: str) -> None:
    row["device_warm_s"], row["device_cold_s"] = row[f"{landing}_warm_s"], row[f"{landing}_cold_s"]
    row["prefill_over_device_warm"] = round(prefill_s / row["device_warm_s"], 2)
    row["prefill_over_device_cold"] = round(prefill_s / row["device_cold_s"], 2)
    if "node_warm_s" in row:
        row["prefill_over_node_warm"] = round(prefill_s / row["node_warm_s"], 2)
        row["prefill_over_node_cold"] = round(prefill_s / row["node_cold_s"], 2)
    row["bytes_per_token_read"] = round(row["device_bytes_read"] / row["tokens"])


def int8_rows(h: Harness, work: Path, tokens, caches, contexts, prefill, landing, labels) -> dict:
    """The same context checkpointed with int8 KV (per position and head, fp16 scales)."""
    root = work / "store-int8"
    checkpoint = checkpoint_cost(h, root, "context", tokens, caches, "int8")
    _log(f"int8 checkpoint {checkpoint}")
    store = _store(root, "int8")
    rows = []
    for n in contexts:
        row = {
            **restore_rows(h, store, "context", n, root, labels),
            "prefill_s": prefill[n],
        }
        _headline(row, prefill[n], landing)
        row["ttft_after_restore_s"] = round(ttft_after_restore(h, store, "context", n, landing), 4)
        rows.append(row)
        _log(f"int8 restore {n}: {row}")
    shutil.rmtree(root, ignore_errors=True)
    return {
        "checkpoint": checkpoint,
        "restore": rows,
        "cost_model": cost_model_rows(prefill, rows, contexts[:2]),
    }


def ttft_after_restore(h: Harness, store, agent: str, n: int, landing: str) -> float:
    from node.memory import device_restore

    suffix = h.tokens(SUFFIX, seed=10_000 + n)
    h.mx.synchronize()
    started = time.perf_counter()
    result = device_restore.restore(store, agent, h.make_caches, h.dtype, lambda t: n, landing=landing)
    h.feed(result.caches, suffix, logits=True)
    seconds = time.perf_counter() - started
    del result
    h.free()
    return seconds


def mlx_lm_peer(h: Harness, tokens: list[int], root: Path) -> dict:
    """mlx-lm's prompt cache: prefill, save_prompt_cache, load_prompt_cache + eval (warm, cold)."""
    from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

    mx = h.mx
    caches = make_prompt_cache(h.model)
    mx.synchronize()
    started = time.perf_counter()
    h.feed(caches, tokens, logits=True)
    prefill_s = time.perf_counter() - started
    path = root / f"mlx-lm-{len(tokens)}.safetensors"
    started = time.perf_counter()
    save_prompt_cache(str(path), caches)
    save_s = time.perf_counter() - started
    del caches
    h.free()

    def load() -> float:
        began = time.perf_counter()
        loaded = load_prompt_cache(str(path))
        mx.eval([c.state for c in loaded])
        return time.perf_counter() - began

    warm = min(load() for _ in range(3))
    h.free()
    method = drop_page_cache([path])
    cold = load()
    h.free()
    size = path.stat().st_size
    path.unlink()
    return {
        "tokens": len(tokens),
        "prefill_s": round(prefill_s, 4),
        "save_s": round(save_s, 4),
        "file_bytes": size,
        "load_warm_s": round(warm, 4),
        "load_cold_s": round(cold, 4),
        "cold_method": method,
    }


def decode_rows(h: Harness, store, agent: str, context: int, landing: str) -> list[dict]:
    """1, 3, 8 agents restored at `context` tokens, each given its own message, decoded batched."""
    from node.memory import device_restore
    from node.runtime.batching import batched_step
    from node.runtime.generation import CachedContext, SamplingParams, Sequence

    class Engine:  # what Sequence asks of an engine
        model, context_limit, eos_token_ids = h.model, 1 << 20, frozenset()
        make_caches = staticmethod(h.make_caches)

        @staticmethod
        def decode(ids):
            return ""

    rows = []
    for count in AGENT_COUNTS:
        sequences = []
        for i in range(count):
            restored = device_restore.restore(
                store, agent, h.make_caches, h.dtype, lambda t: context, landing=landing
            )
            prompt = restored.tokens + h.tokens(16, seed=20_000 + i)
            sequence = Sequence(
                Engine,
                CachedContext(restored.caches, list(restored.tokens)),
                prompt,
                SamplingParams(max_tokens=10**6),
            )
            while sequence.prefilling:
                sequence.prefill_chunk()
            sequences.append(sequence)
        for _ in range(2):
            batched_step(h.model, sequences)
        h.mx.synchronize()
        started = time.perf_counter()
        for _ in range(DECODE_STEPS):
            batched_step(h.model, sequences)
        seconds = time.perf_counter() - started
        rows.append(
            {
                "agents": count,
                "context": context,
                "steps": DECODE_STEPS,
                "aggregate_tok_s": round(count * DECODE_STEPS / seconds, 1),
                "per_agent_tok_s": round(DECODE_STEPS / seconds, 1),
            }
        )
        _log(f"decode {count} agent(s) at {context} tokens: {rows[-1]['aggregate_tok_s']} tok/s aggregate")
        del sequences
        h.free()
    return rows


def quantized_rows(h: Harness, contexts: list[int], bits: int) -> dict:
    from mlx import nn

    nn.quantize(h.model, group_size=64, bits=bits)
    h.mx.eval(h.model.parameters())
    h.prefill(h.tokens(min(contexts), seed=1))  # warm-up
    prefill = []
    for n in contexts:
        seconds, caches = h.prefill(h.tokens(n, seed=30_000 + n))
        prefill.append({"tokens": n, "prefill_s": round(seconds, 4), "tok_s": round(n / seconds, 1)})
        _log(f"{bits}-bit prefill {n}: {seconds:.3f} s ({n / seconds:,.0f} tok/s)")
        del caches
        h.free()
    return {"bits": bits, "group_size": 64, "prefill": prefill}


def _quantized_decode(h: Harness, context: int) -> float:
    mx = h.mx
    _, caches = h.prefill(h.tokens(context, seed=40_000))
    token = mx.array([[1]])
    for _ in range(2):
        mx.eval(mx.argmax(h.model(token, cache=caches)[:, -1], axis=-1))
    mx.synchronize()
    started = time.perf_counter()
    for _ in range(DECODE_STEPS):
        token = mx.argmax(h.model(token, cache=caches)[:, -1], axis=-1)[None]
        mx.eval(token)
    return round(DECODE_STEPS / (time.perf_counter() - started), 1)


def environment() -> dict:
    import mlx.core as mx

    from node.model import blas

    info = {
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "python": platform.python_version(),
        "cpu_fast_paths_bound": blas.thin_calls() is not None,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    try:
        import mlx_lm

        info["mlx_lm"] = mlx_lm.__version__
    except (ImportError, AttributeError):
        pass
    try:
        info["gpu"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            check=False, capture_output=True, text=True, timeout=20,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        info["gpu"] = None
    return info


def cost_model_rows(prefill: dict[int, float], restores: list[dict], calibration: list[int]) -> dict:
    from node.memory.cost_model import CostModel

    by_n = {r["tokens"]: r for r in restores}
    model = CostModel.fit(
        [(n, prefill[n]) for n in calibration],
        [(by_n[n]["device_bytes_read"], by_n[n]["device_warm_s"]) for n in calibration],
        [(by_n[n]["device_bytes_read"], by_n[n]["device_cold_s"]) for n in calibration],
    )
    rows = []
    for r in restores:
        n = r["tokens"]
        row = {"tokens": n, "prefill_s": prefill[n]}
        for cold in (False, True):
            label = "cold" if cold else "warm"
            choice = model.choose(n, n, r["device_bytes_read"], cold=cold)
            measured = r[f"device_{label}_s"] if choice.restore else prefill[n]
            row[f"{label}_choice"] = "restore" if choice.restore else "recompute"
            row[f"{label}_predicted_s"] = round(choice.estimated_s, 4)
            row[f"{label}_chosen_s"] = measured
            row[f"{label}_prefill_over_chosen"] = round(prefill[n] / measured, 2)
        rows.append(row)
    return {"calibrated_on": calibration, "model": model.as_dict(), "rows": rows}


def run(args: argparse.Namespace) -> dict:
    import node.model  # noqa: F401  (binds the CPU BLAS first; nothing on a GPU)

    contexts = sorted(int(c) for c in args.contexts.split(","))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu-restore-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"environment": environment(), "synthetic": args.synthetic, "chunk": CHUNK}
    _log(f"environment: {result['environment']}")
    h = Harness(args.synthetic)
    result["model"] = {
        "build_s": round(h.build_s, 2),
        "parameter_bytes": h.parameter_bytes,
        "dtype": "bfloat16",
    }
    _log(f"model built in {h.build_s:.1f} s, {h.parameter_bytes / 1e9:.1f} GB")
    h.prefill(h.tokens(min(contexts), seed=1))  # warm-up: kernels compiled
    h.prefill(h.tokens(min(contexts) + SUFFIX, seed=2))  # and those of a SUFFIX-token chunk
    h.free()

    prefill, rows, largest = {}, [], None
    for n in contexts:
        tokens = h.tokens(n, seed=n)
        first, caches = h.prefill(tokens)
        if n != contexts[-1]:
            del caches
            h.free()
            second, caches = h.prefill(tokens)
        else:
            second = first
        prefill[n] = round(min(first, second), 4)
        rows.append(
            {
                "tokens": n,
                "prefill_first_s": round(first, 4),
                "prefill_s": prefill[n],
                "tok_s": round(n / prefill[n], 1),
            }
        )
        _log(f"prefill {n}: {prefill[n]:.3f} s ({n / prefill[n]:,.0f} tok/s)")
        if n == contexts[-1]:
            largest = (tokens, caches)
        else:
            del caches
            h.free()
    result["prefill"] = rows
    _save(args, result)

    root = work / "store"
    tokens, caches = largest
    result["checkpoint"] = [checkpoint_cost(h, root, "context", tokens, caches, args.storage)]
    _log(f"checkpoint {result['checkpoint'][0]}")
    _save(args, result)

    store = _store(root, args.storage)
    landings = device_landings()
    result["landings_agree"] = landings_agree(h, store, "context", contexts[0], landings)
    _log(f"landings agree with the copy landing: {result['landings_agree']}")
    correct = tuple(name for name in landings if result["landings_agree"].get(name, True))
    labels = (("node",) if args.node_restore else ()) + correct
    restores = []
    for n in contexts:
        restores.append({**restore_rows(h, store, "context", n, root, labels), "prefill_s": prefill[n]})
        _log(f"restore {n}: {restores[-1]}")
        _save(args, result | {"restore": restores})
    # The node's landing: the fastest correct one at the largest context, warm (what
    # device_restore.best_landing picks on this kind of machine).
    landing = min(correct, key=lambda label: restores[-1][f"{label}_warm_s"])
    result["landing"] = landing
    result["node_landing"] = _node_landing()
    for row in restores:
        _headline(row, prefill[row["tokens"]], landing)
        row["ttft_after_restore_s"] = round(
            ttft_after_restore(h, store, "context", row["tokens"], landing), 4
        )
    result["restore"] = restores
    result["cost_model"] = cost_model_rows(prefill, restores, contexts[:2])
    _save(args, result)

    result["mlx_lm_peer"] = []
    for n in contexts:
        result["mlx_lm_peer"].append(mlx_lm_peer(h, h.tokens(n, seed=n), work))
        _log(f"mlx-lm {result['mlx_lm_peer'][-1]}")
        _save(args, result)

    result["decode"] = decode_rows(h, store, "context", args.decode_context, landing)
    _save(args, result)
    if args.int8:
        result["int8"] = int8_rows(h, work, tokens, caches, contexts, prefill, landing, correct)
        _save(args, result)
    del caches, largest
    h.free()
    if args.bits:
        result["quantized"] = quantized_rows(
            h, [c for c in contexts if c in (contexts[1], contexts[-1])], args.bits
        )
        result["quantized"]["decode_1_tok_s"] = _quantized_decode(h, args.decode_context)
        _log(f"quantized {result['quantized']}")
    return result


def _node_landing() -> str:
    from node.memory import device_restore

    return device_restore.best_landing()


def summary(result: dict) -> None:
    """The figures side by side, as the docs table prints them."""
    _log(f"landing: {result['landing']} (landings agree: {result['landings_agree']})")
    _log("tokens | prefill s | node restore warm/cold s | device restore warm/cold s | prefill/device warm, cold | "
         "TTFT after restore s | bytes/token read")  # fmt: skip
    for r in result["restore"]:
        _log(
            f"{r['tokens']} | {r['prefill_s']} | {r.get('node_warm_s')} / {r.get('node_cold_s')} | {r['device_warm_s']} / "
            f"{r['device_cold_s']} | {r['prefill_over_device_warm']}x, {r['prefill_over_device_cold']}x | "
            f"{r['ttft_after_restore_s']} | {r['bytes_per_token_read']}"
        )
    for r in result["cost_model"]["rows"]:
        _log(f"cost model {r}")
    for r in result["mlx_lm_peer"]:
        _log(f"mlx-lm {r}")
    for r in result.get("int8", {}).get("restore", []):
        _log(f"int8 {r['tokens']} | prefill {r['prefill_s']} | warm {r['device_warm_s']} ({r['prefill_over_device_warm']}x) | "
             f"cold {r['device_cold_s']} ({r['prefill_over_device_cold']}x) | TTFT {r['ttft_after_restore_s']}")  # fmt: skip


def _save(args: argparse.Namespace, result: dict) -> None:
    """Written after every section, so a run cut short still leaves what it measured."""
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", default="gemma3-12b", help="gemma3-12b or tiny (a CPU dry run)")
    parser.add_argument("--contexts", default="2048,8192,20480,32768")
    parser.add_argument("--storage", default="float16", help="KV storage of the checkpoints")
    parser.add_argument("--bits", type=int, default=4, help="also measure the model quantized (0: no)")
    parser.add_argument("--decode-context", type=int, default=2048)
    parser.add_argument(
        "--int8", type=int, default=1, help="also checkpoint and restore with int8 KV (0: no)"
    )
    parser.add_argument(
        "--node-restore", type=int, default=1, help="also time the store's host-side restore (0: no)"
    )
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--json", default="bench_results/gpu_restore.json")
    args = parser.parse_args(argv)
    result = run(args)
    _save(args, result)
    summary(result)
    _log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

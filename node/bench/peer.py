"""Scenario 5: llama.cpp on the same GGUF file and the same token ids, beside this node.

llama.cpp runs in subprocesses (`node.bench.llama_worker`): one prefills each context cold and
saves llama.cpp's own state file; then, `peer_rounds` times, a fresh process of ours and a fresh
one of llama.cpp each restore every context and decode after it, one after the other. Restore and
decode figures are the medians of the rounds (each round's are in the JSON): on a shared host one
pass of each side swung by 10-30% from minute to minute, so a single pass per side compared two
moments of the host, not two programs. Prefill figures are one cold prefill per side (scenario 3's
contexts are ours).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from node.bench.context import restore_in_fresh_process
from node.bench.results import Outcome, Table, median, skipped
from node.bench.workbench import Bench

HOW_TO_ENABLE = (
    "llama-cpp-python is not installed; enable the peer with `pip install 'persistent-agent-node[peer]'` "
    '(on x86 CPUs without -march=native support build it as: CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON '
    '-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" pip install llama-cpp-python; '
    "on CPUs without AVX-512 use -DGGML_AVX512=OFF)"
)


def gguf_path(bench: Bench) -> Path | None:
    spec = bench.options.model
    if spec == "default":
        from node.model.spec import default_gguf

        return default_gguf(bench.say)
    path = Path(spec).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None


def _write_contexts(bench: Bench, built: list[dict], path: Path, first_tokens: dict | None = None) -> Path:
    contexts = [{"tokens": b["tokens"], "ids": b["prompt"]} for b in built]
    path.write_text(json.dumps({"contexts": contexts, "first_tokens": first_tokens or {}}))
    return path


def _llama(bench: Bench, command: str, gguf: Path, contexts: Path) -> dict:
    argv = [
        "-m",
        "node.bench.llama_worker",
        command,
        "--gguf",
        str(gguf),
        "--contexts",
        str(contexts),
        "--state-dir",
        str(bench.work_dir / "peer"),
        "--decode",
        str(bench.profile.restored_decode_tokens),
    ]
    return bench.run_json(argv)


def _row(ours_built: dict, cold: dict, ours: list[dict], llama: list[dict]) -> dict:
    """One context's figures; `ours` and `llama` hold its restore + decode in each round."""
    return {
        "tokens": cold["tokens"],
        "ours_prefill_s": ours_built["prefill_s"],
        "llama_prefill_s": cold["prefill_s"],
        "ours_restore_s": median([r["restore_s"] for r in ours], 5),
        "llama_restore_s": median([r["restore_s"] for r in llama], 5),
        "ours_decode_tok_s": median([r["decode_tok_s"] for r in ours], 5),
        "llama_decode_tok_s": median([r["decode_tok_s"] for r in llama], 5),
        "ours_decode_tok_s_rounds": [r["decode_tok_s"] for r in ours],
        "llama_decode_tok_s_rounds": [r["decode_tok_s"] for r in llama],
        "ours_bytes_on_disk": ours_built["bytes_on_disk"],
        "llama_state_bytes": cold["state_bytes"],
        "llama_save_s": cold["save_s"],
        "same_next_token": cold["first_token"] == ours_built["unfed_tokens"][0],
    }


def llama_cpp_installed() -> bool:
    return (
        importlib.util.find_spec("llama_cpp") is not None
    )  # not imported here: ggml stays out of this process


async def run(bench: Bench) -> Outcome:
    if not llama_cpp_installed():
        return skipped(HOW_TO_ENABLE)
    gguf = gguf_path(bench)
    if gguf is None:
        return skipped(f"model {bench.options.model!r} is not a GGUF file; llama.cpp needs one")
    built = [await bench.context(size) for size in bench.profile.context_sizes]
    (bench.work_dir / "peer").mkdir(exist_ok=True)
    contexts = _write_contexts(bench, built, bench.work_dir / "peer" / "contexts.json")
    bench.say(f"llama.cpp: cold prefill + state save of {len(built)} contexts ({gguf.name}) ...")
    cold = _llama(bench, "build", gguf, contexts)
    firsts = {str(r["tokens"]): r["first_token"] for r in cold["contexts"]}
    _write_contexts(bench, built, contexts, firsts)
    rounds = bench.profile.peer_rounds
    ours, llama = [], []  # per round: one restore + decode row per context
    for i in range(rounds):
        bench.say(f"round {i + 1}/{rounds}: restore and decode in fresh processes, ours then llama.cpp ...")
        ours.append(restore_in_fresh_process(bench, built)["agents"])
        llama.append(_llama(bench, "restore", gguf, contexts)["contexts"])
    rows = [
        _row(b, c, [r[j] for r in ours], [r[j] for r in llama])
        for j, (b, c) in enumerate(zip(built, cold["contexts"]))
    ]
    results = {
        "gguf": str(gguf),
        "llama_load_s": cold["load_s"],
        "threads": cold["threads"],
        "rounds": rounds,
        "contexts": rows,
    }
    table = Table(
        [
            "tokens",
            "prefill s ours",
            "prefill s llama",
            "restore s ours",
            "restore s llama",
            "decode tok/s ours",
            "decode tok/s llama",
            "MB ours",
            "MB llama",
        ]
    )
    for r in rows:
        table.add(
            r["tokens"],
            r["ours_prefill_s"],
            r["llama_prefill_s"],
            r["ours_restore_s"],
            r["llama_restore_s"],
            r["ours_decode_tok_s"],
            r["llama_decode_tok_s"],
            round(r["ours_bytes_on_disk"] / 1e6, 2),
            round(r["llama_state_bytes"] / 1e6, 2),
        )
    notes = [
        f"llama.cpp {cold['threads']} threads, model load {cold['load_s']:.2f} s; same token ids on both sides",
        (
            f"restore and decode: medians of {rounds} rounds, each a fresh process of ours then one of "
            "llama.cpp; prefill: one cold prefill per side"
        ),
        (
            "llama.cpp's state file (llama_state_save_file) holds f16 K/V, as our blocks do; it is not "
            "fsynced (ours are) and holds no digests (ours are checked on every read)"
        ),
    ]
    return Outcome(results, table, notes)

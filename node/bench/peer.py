"""Scenario 5: llama.cpp on the same GGUF file and the same token ids, beside this node.

llama.cpp runs in subprocesses (`node.bench.llama_worker`): one prefills each context cold and
saves llama.cpp's own state file, a fresh one restores each state and decodes. Our figures come
from scenario 3 when it ran (else each context is built here, and only the cold side is ours).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from node.bench.results import Outcome, Table, skipped
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


def _row(ours_built: dict, ours: dict | None, cold: dict, warm: dict) -> dict:
    return {
        "tokens": cold["tokens"],
        "ours_prefill_s": ours_built["prefill_s"],
        "llama_prefill_s": cold["prefill_s"],
        "ours_restore_s": ours["restore_s"] if ours else None,
        "llama_restore_s": warm["restore_s"],
        "ours_decode_tok_s": ours["restored_decode_tok_s"] if ours else None,
        "llama_decode_tok_s": warm["decode_tok_s"],
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
    bench.say("llama.cpp: state restore in a fresh process ...")
    warm = _llama(bench, "restore", gguf, contexts)
    ours = {r["tokens"]: r for r in bench.shared.get("context_scaling", [])}
    rows = [
        _row(b, ours.get(b["tokens"]), c, w) for b, c, w in zip(built, cold["contexts"], warm["contexts"])
    ]
    results = {
        "gguf": str(gguf),
        "llama_load_s": cold["load_s"],
        "threads": cold["threads"],
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
            "llama.cpp's state file (llama_state_save_file) holds f16 K/V, as our blocks do; it is not "
            "fsynced (ours are) and holds no digests (ours are checked on every read)"
        ),
    ]
    if not ours:
        notes.append("scenario 'context' did not run: our restore and decode columns are empty")
    return Outcome(results, table, notes)

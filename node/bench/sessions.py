"""Scenarios 1 and 2: one session (expect parity), and five sessions each in a fresh process.

Scenario 2 runs the real CLI (`python -m node generate --agent ID`) once per session, so every
session is a new process that loads the model and restores the agent from disk; the cold baseline
prefills the very same prompt from scratch in this process and must give the same greedy text.
"""

from __future__ import annotations

import time

from node.bench import corpus
from node.bench.results import Outcome, Table
from node.bench.workbench import Bench


def _cold(bench: Bench, prompt: list[int], max_tokens: int):
    from node.runtime.generation import CachedContext, SamplingParams, generate

    started = time.perf_counter()
    completion = generate(
        bench.engine, CachedContext(bench.engine.make_caches()), prompt, SamplingParams(max_tokens=max_tokens)
    )
    return completion, time.perf_counter() - started


async def run_single(bench: Bench) -> Outcome:
    from node.runtime.generation import SamplingParams

    prompt = corpus.tokens(bench.engine, 256) + bench.engine.encode(corpus.question(0), add_bos=False)
    tokens = bench.profile.task_tokens
    _cold(bench, prompt[:16], 2)  # warm-up, so neither side pays first-call costs
    bench.say(
        f"single session: {len(prompt)}-token prompt, {tokens} tokens, cold engine then agent manager ..."
    )
    cold, cold_s = _cold(bench, prompt, tokens)
    manager = await bench.new_manager("single")
    try:
        started = time.perf_counter()
        node = await manager.generate("single-session", prompt, SamplingParams(max_tokens=tokens))
        node_s = time.perf_counter() - started
        checkpoint_s = manager.stats()["agents"]["single-session"]["checkpoint_s"]
    finally:
        await manager.close()
    results = {
        "prompt_tokens": len(prompt),
        "generated_tokens": node.usage.generated_tokens,
        "cold_s": round(cold_s, 4),
        "node_s": round(node_s, 4),
        "node_checkpoint_s": checkpoint_s,
        "node_over_cold": round(node_s / cold_s, 4),
        "same_text": node.text == cold.text,
    }
    table = Table(["side", "wall s", "prefill s", "decode s", "checkpoint s"])
    table.add("cold engine", results["cold_s"], cold.usage.prefill_s, cold.usage.generate_s, None)
    table.add("agent manager", results["node_s"], node.usage.prefill_s, node.usage.generate_s, checkpoint_s)
    return Outcome(
        results,
        table,
        [f"node/cold = {results['node_over_cold']:.3f} (parity expected); same text: {results['same_text']}"],
    )


def _session_prompt(bench: Bench, store, agent_id: str, text: str) -> list[int]:
    """The prompt `node generate --agent` builds: history + its unfed token + the new text."""
    history = store.tokens(agent_id)
    if history:
        history += store.manifest(agent_id)["metadata"].get("unfed_tokens", [])
    return history + bench.engine.encode(text, add_bos=not history)


def _session(bench: Bench, cache_dir, text: str) -> dict:
    argv = [
        "-m",
        "node",
        "generate",
        text,
        "--agent",
        "analyst",
        "--json",
        "--model",
        bench.options.model,
        "--cache-dir",
        str(cache_dir),
        "--max-tokens",
        str(bench.profile.task_tokens),
    ]
    return bench.run_json(argv)


def _row(number: int, prompt: list[int], session: dict, cold, cold_s: float) -> dict:
    usage = session["usage"]
    node_task_s = usage["restore_s"] + usage["prefill_s"] + usage["generate_s"]
    cold_task_s = cold.usage.prefill_s + cold.usage.generate_s
    return {
        "session": number,
        "prompt_tokens": len(prompt),
        "cached_tokens": usage["cached_tokens"],
        "prefilled_tokens": usage["prefilled_tokens"],
        "node_restore_s": usage["restore_s"],
        "node_task_s": round(node_task_s, 4),
        "node_process_wall_s": session["process_wall_s"],
        "cold_task_s": round(cold_task_s, 4),
        "cold_wall_s": round(cold_s, 4),
        "percent_faster": round(100 * (cold_task_s - node_task_s) / cold_task_s, 1),
        "same_text": session["text"] == cold.text,
    }


async def run_resume(bench: Bench) -> Outcome:
    from node.memory.checkpoint import CheckpointStore

    cache_dir = bench.work_dir / "resume"
    store = CheckpointStore(cache_dir, bench.engine.info.fingerprint)
    texts = [corpus.document_of(bench.engine, bench.profile.resume_context) + corpus.question(0)]
    texts += [corpus.question(n) for n in range(1, bench.profile.resume_sessions)]
    rows = []
    for number, text in enumerate(texts, start=1):
        prompt = _session_prompt(bench, store, "analyst", text)
        bench.say(
            f"session {number}/{len(texts)}: fresh process ({len(prompt)}-token prompt), then cold prefill ..."
        )
        session = _session(bench, cache_dir, text)
        cold, cold_s = _cold(bench, prompt, bench.profile.task_tokens)
        rows.append(_row(number, prompt, session, cold, cold_s))
    node_total = sum(r["node_task_s"] for r in rows)
    cold_total = sum(r["cold_task_s"] for r in rows)
    results = {
        "sessions": rows,
        "node_total_s": round(node_total, 4),
        "cold_total_s": round(cold_total, 4),
        "percent_faster": round(100 * (cold_total - node_total) / cold_total, 1),
        "resumed_percent_faster": _resumed_gain(rows),
        "all_same_text": all(r["same_text"] for r in rows),
    }
    table = Table(
        [
            "session",
            "prompt tok",
            "cached",
            "restore s",
            "node task s",
            "cold task s",
            "% faster",
            "same text",
        ]
    )
    for r in rows:
        table.add(
            r["session"],
            r["prompt_tokens"],
            r["cached_tokens"],
            r["node_restore_s"],
            r["node_task_s"],
            r["cold_task_s"],
            r["percent_faster"],
            r["same_text"],
        )
    table.add(
        "total",
        None,
        None,
        None,
        results["node_total_s"],
        results["cold_total_s"],
        results["percent_faster"],
        results["all_same_text"],
    )
    notes = [
        (
            "task time = restore + prefill of new tokens + decode; both sides also pay a model load per fresh process "
            "(node processes' wall time, load included, is in node_process_wall_s)"
        )
    ]
    return Outcome(results, table, notes)


def _resumed_gain(rows: list[dict]) -> float | None:
    """% faster over the sessions after the first (the first has nothing to restore)."""
    later = rows[1:]
    if not later:
        return None
    cold, node = sum(r["cold_task_s"] for r in later), sum(r["node_task_s"] for r in later)
    return round(100 * (cold - node) / cold, 1)

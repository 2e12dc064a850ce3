"""Scenario 10: sampling a token from a decode step's logits, node's samplers against mlx-lm's.

The logits of one step of the model over its whole vocabulary, sampled at temperature 0.8 with
every token and with top_p 0.9 (what the OpenAI and Anthropic SDKs send unless told otherwise, and
a common nucleus), by `node.runtime.sampling` and by mlx-lm's `make_sampler`, alternating, ROUNDS
times each after one untimed draw (mlx-lm compiles its kernels on the first). Median milliseconds
per token and the speedup. Greedy decoding draws nothing (an argmax).
"""

from __future__ import annotations

import statistics
import time

from node.bench import corpus
from node.bench.results import Outcome, Table
from node.bench.workbench import Bench

SETTINGS = ((0.8, 1.0), (0.8, 0.9))  # (temperature, top_p)
ROUNDS = 30


def _timed(sampler, logits) -> float:
    import mlx.core as mx

    started = time.perf_counter()
    mx.eval(sampler(logits))
    return time.perf_counter() - started


async def run(bench: Bench) -> Outcome:
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler as mlx_lm_sampler

    from node.runtime.sampling import make_sampler

    engine = bench.engine
    logits = engine.model(mx.array(corpus.tokens(engine, 64))[None], cache=engine.make_caches())[:, -1, :]
    mx.eval(logits)
    table = Table(["temperature", "top_p", "ours ms", "mlx-lm ms", "speedup"])
    rows = []
    for temperature, top_p in SETTINGS:
        bench.say(
            f"sampling at temperature {temperature}, top_p {top_p}: {ROUNDS} draws each, alternating ..."
        )
        ours, theirs = make_sampler(temperature, top_p), mlx_lm_sampler(temperature, top_p=top_p)
        for sampler in (ours, theirs):  # untimed: mlx-lm compiles its kernels on the first draw
            _timed(sampler, logits)
        times = {"ours": [], "mlx_lm": []}
        for _ in range(ROUNDS):
            times["ours"].append(_timed(ours, logits))
            times["mlx_lm"].append(_timed(theirs, logits))
        ours_ms, theirs_ms = (round(statistics.median(times[k]) * 1000, 3) for k in ("ours", "mlx_lm"))
        row = {
            "temperature": temperature,
            "top_p": top_p,
            "ours_ms": ours_ms,
            "mlx_lm_ms": theirs_ms,
            "speedup": round(theirs_ms / ours_ms, 1) if ours_ms else None,
        }
        rows.append(row)
        table.add(temperature, top_p, ours_ms, theirs_ms, row["speedup"])
    notes = [f"vocabulary of {logits.shape[-1]} tokens; medians of {ROUNDS} draws per side, alternating"]
    return Outcome({"vocabulary": logits.shape[-1], "rounds": ROUNDS, "rows": rows}, table, notes)

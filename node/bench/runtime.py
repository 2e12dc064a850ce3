"""Scenario 0: model load (cold conversion and warm), prefill rate, decode rate (issue 2 targets)."""

from __future__ import annotations

import statistics
import tempfile

from node.bench import corpus
from node.bench.results import Outcome, Table
from node.bench.workbench import Bench

PREFILL_SAMPLES = 3
TARGETS = {"warm_load_s": ("<=", 5.0), "prefill_tok_s_512": (">=", 250.0), "decode_tok_s": (">=", 6.0)}


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return round(ours / theirs, 2) if ours and theirs else None


def _meets(value: float | None, rule: tuple[str, float]) -> bool | None:
    if value is None:
        return None
    op, bound = rule
    return value <= bound if op == "<=" else value >= bound


def _loads(bench: Bench, notes: list[str]) -> dict:
    figures = {"parent_load_s": round(bench.engine.info.load_s, 3), "cold_load_s": None}
    if bench.profile.cold_conversion:
        bench.say("cold load: converting the model into a throwaway cache in a subprocess ...")
        with tempfile.TemporaryDirectory(dir=bench.work_dir, prefix="model-cache-") as cache:
            figures["cold_load_s"] = bench.run_worker("load", env=bench.child_env(NODE_MODEL_CACHE=cache))[
                "load_s"
            ]
    else:
        notes.append("cold conversion skipped (--quick); run without --quick to measure it")
    bench.say("warm load in a fresh process ...")
    figures["warm_load_s"] = bench.run_worker("load")["load_s"]
    return figures


async def _decode_rate(bench: Bench, agent_id: str = "decode-probe") -> dict:
    from node.runtime.generation import SamplingParams

    manager = await bench.contexts_manager()
    prompt = corpus.tokens(bench.engine, 32)
    bench.say(f"decoding {bench.profile.decode_tokens} tokens after a 32-token prompt ({agent_id}) ...")
    completion = await manager.generate(
        agent_id, prompt, SamplingParams(max_tokens=bench.profile.decode_tokens)
    )
    usage = completion.usage
    steps = usage.generated_tokens - 1
    rate = round(steps / usage.generate_s, 3) if steps > 0 and usage.generate_s > 0 else None
    return {"decode_tokens": usage.generated_tokens, "decode_s": usage.generate_s, "decode_tok_s": rate}


async def _warm_up(bench: Bench) -> None:
    """Untimed: the first calls of a process trace the model and load MLX's compiled kernels."""
    from node.runtime.generation import SamplingParams

    manager = await bench.contexts_manager()
    size = bench.profile.prefill_sizes[0]
    bench.say(f"warm-up: {size}-token prompt, 2 tokens (untimed) ...")
    await manager.generate("warm-up", corpus.tokens(bench.engine, size), SamplingParams(max_tokens=2))


async def _prefill_s(bench: Bench, agent_id: str, size: int) -> float:
    from node.runtime.generation import SamplingParams

    manager = await bench.contexts_manager()
    completion = await manager.generate(
        agent_id, corpus.tokens(bench.engine, size), SamplingParams(max_tokens=1)
    )
    return completion.usage.prefill_s


async def _prefill_rates(bench: Bench, size: int, samples: int) -> list[float]:
    """tok/s of `samples` cold prefills: the shared context build plus fresh agents."""
    rates = [size / (await bench.context(size))["prefill_s"]]
    for i in range(1, samples):
        rates.append(size / await _prefill_s(bench, f"prefill-probe-{size}-{i}", size))
    return [round(r, 2) for r in rates]


async def _side_by_side(bench: Bench, size: int, ours: list[float], samples: int) -> dict:
    """Prefill (alternating with ours) and decode on MLX's own kernels, in this process."""
    from node.model.cpu_kernels import mlx_defaults

    bench.say(f"prefill of {size} tokens and decode on MLX's own kernels, alternating with ours ...")
    theirs: list[float] = []
    for i in range(samples):
        if i:  # ours again, so both sides sample the same stretch of a shared machine
            ours.append(round(size / await _prefill_s(bench, f"prefill-probe-{size}-again-{i}", size), 2))
        with mlx_defaults(bench.engine.model) as switched:
            if not switched:
                return {}
            theirs.append(round(size / await _prefill_s(bench, f"mlx-kernels-ctx-{size}-{i}", size), 2))
    with mlx_defaults(bench.engine.model):
        decode = await _decode_rate(bench, "mlx-kernels-decode-probe")
    return {
        f"mlx_kernels_prefill_tok_s_{size}": statistics.median(theirs),
        f"mlx_kernels_prefill_samples_{size}": theirs,
        "mlx_kernels_decode_tok_s": decode["decode_tok_s"],
    }


async def run(bench: Bench) -> Outcome:
    notes: list[str] = []
    results = _loads(bench, notes)
    await _warm_up(bench)
    samples = {}
    for size in bench.profile.prefill_sizes:
        bench.say(f"cold prefill of {size} tokens, {PREFILL_SAMPLES} samples ...")
        samples[size] = await _prefill_rates(bench, size, PREFILL_SAMPLES)
    results.update(await _decode_rate(bench))
    first = bench.profile.prefill_sizes[0]
    side_by_side = await _side_by_side(bench, first, samples[first], PREFILL_SAMPLES)
    for size, rates in samples.items():
        results[f"prefill_tok_s_{size}"] = statistics.median(rates)
        results[f"prefill_samples_{size}"] = rates
    results.update(side_by_side)
    if side_by_side:
        results[f"prefill_speedup_{first}"] = _ratio(
            results[f"prefill_tok_s_{first}"], side_by_side[f"mlx_kernels_prefill_tok_s_{first}"]
        )
        results["decode_speedup"] = _ratio(results["decode_tok_s"], side_by_side["mlx_kernels_decode_tok_s"])
        notes.append(
            "mlx_kernels_*: the same work with node.model.cpu_kernels and the thin-sgemm paths switched off in this "
            "process (MLX's own kernels, every matmul through OpenBLAS sgemm), alternating with ours; "
            "speedup = ours / that"
        )
    notes.append(
        "prefill rate = tokens / time to first token (includes one forward step of the last token); "
        "median of the samples in prefill_samples_* (the machine is shared, single runs vary by +-20%)"
    )
    notes.append(
        "an untimed warm-up of the first prefill size runs first (tracing, compiled kernels, buffer cache)"
    )
    results["targets"] = {
        name: {"rule": f"{op} {bound:g}", "met": _meets(results.get(name), (op, bound))}
        for name, (op, bound) in TARGETS.items()
    }
    table = Table(["metric", "value", "target", "met"])
    for name in (
        "cold_load_s",
        "warm_load_s",
        "parent_load_s",
        *[f"prefill_tok_s_{s}" for s in bench.profile.prefill_sizes],
        "decode_tok_s",
        *[f"mlx_kernels_prefill_tok_s_{first}", "mlx_kernels_decode_tok_s", f"prefill_speedup_{first}"],
        "decode_speedup",
    ):
        target = results["targets"].get(name, {})
        table.add(name, results.get(name), target.get("rule"), target.get("met"))
    return Outcome(results, table, notes)

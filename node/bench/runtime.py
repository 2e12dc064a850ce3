"""Scenario 0: model load (cold conversion and warm), prefill rate, decode rate (issue 2 targets)."""

from __future__ import annotations

import tempfile

from node.bench import corpus
from node.bench.results import Outcome, Table
from node.bench.workbench import Bench

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
    from node.generation import SamplingParams

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
    from node.generation import SamplingParams

    manager = await bench.contexts_manager()
    size = bench.profile.prefill_sizes[0]
    bench.say(f"warm-up: {size}-token prompt, 2 tokens (untimed) ...")
    await manager.generate("warm-up", corpus.tokens(bench.engine, size), SamplingParams(max_tokens=2))


async def _with_mlx_kernels(bench: Bench, size: int) -> dict:
    """The same prefill and decode on MLX's own kernels, in this process, right after ours."""
    from node.cpu_kernels import mlx_defaults
    from node.generation import SamplingParams

    manager = await bench.contexts_manager()
    with mlx_defaults(bench.engine.model) as switched:
        if not switched:
            return {}
        bench.say(f"same prefill of {size} tokens and decode on MLX's own kernels (side by side) ...")
        completion = await manager.generate(
            f"mlx-kernels-ctx-{size}", corpus.tokens(bench.engine, size), SamplingParams(max_tokens=1)
        )
        decode = await _decode_rate(bench, "mlx-kernels-decode-probe")
    return {
        f"mlx_kernels_prefill_tok_s_{size}": round(size / completion.usage.prefill_s, 2),
        "mlx_kernels_decode_tok_s": decode["decode_tok_s"],
    }


async def run(bench: Bench) -> Outcome:
    notes: list[str] = []
    results = _loads(bench, notes)
    await _warm_up(bench)
    for size in bench.profile.prefill_sizes:
        built = await bench.context(size)
        results[f"prefill_s_{size}"] = built["prefill_s"]
        results[f"prefill_tok_s_{size}"] = round(size / built["prefill_s"], 2)
    results.update(await _decode_rate(bench))
    first = bench.profile.prefill_sizes[0]
    side_by_side = await _with_mlx_kernels(bench, first)
    results.update(side_by_side)
    if side_by_side:
        results[f"prefill_speedup_{first}"] = _ratio(
            results[f"prefill_tok_s_{first}"], side_by_side[f"mlx_kernels_prefill_tok_s_{first}"]
        )
        results["decode_speedup"] = _ratio(results["decode_tok_s"], side_by_side["mlx_kernels_decode_tok_s"])
        notes.append(
            "mlx_kernels_*: the same work with node.cpu_kernels and the thin-sgemm paths switched off in this "
            "process (MLX's own kernels, every matmul through OpenBLAS sgemm); speedup = ours / that"
        )
    notes.append("prefill rate = tokens / time to first token (includes one forward step of the last token)")
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
        *[name for name in results if name.startswith(("mlx_kernels_", "prefill_speedup", "decode_speedup"))],
    ):
        target = results["targets"].get(name, {})
        table.add(name, results.get(name), target.get("rule"), target.get("met"))
    return Outcome(results, table, notes)

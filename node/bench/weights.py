"""Scenario 8: the decode weights, int8 (the default on the CPU backend) against fp32, side by side.

Two fresh processes load the same model, one with NODE_INT8_WEIGHTS=0 (fp32, as before issue 20),
prefill the same corpus prompt and decode greedily. Reported: greedy agreement of the int8
continuation with the fp32 one (the first position where they differ, and the share of equal
positions), load, prefill and decode speed of both.
"""

from __future__ import annotations

from node.bench.results import Outcome, Table
from node.bench.workbench import Bench

PROMPT_TOKENS = 512
CONTINUATION_TOKENS = 200


def _greedy(bench: Bench, int8: bool) -> dict:
    bench.say(
        f"{'int8' if int8 else 'fp32'} weights: {CONTINUATION_TOKENS} greedy tokens in a fresh process ..."
    )
    return bench.run_worker(
        "greedy",
        "--prompt-tokens",
        str(PROMPT_TOKENS),
        "--decode",
        str(CONTINUATION_TOKENS),
        env=bench.child_env(NODE_INT8_WEIGHTS="1" if int8 else "0"),
    )


def agreement(reference: list[int], other: list[int]) -> dict:
    compared = min(len(reference), len(other))
    first_difference = next((i for i in range(compared) if reference[i] != other[i]), None)
    same = sum(a == b for a, b in zip(reference, other))
    return {
        "compared_tokens": compared,
        "first_difference": first_difference,
        "same_positions": round(same / compared, 3) if compared else None,
    }


async def run(bench: Bench) -> Outcome:
    fp32, int8 = _greedy(bench, int8=False), _greedy(bench, int8=True)
    agreed = agreement(fp32["token_ids"], int8["token_ids"])
    results = {"prompt_tokens": PROMPT_TOKENS, "fp32": fp32, "int8": int8, "agreement": agreed}
    table = Table(["weights", "load s", f"prefill {PROMPT_TOKENS} s", "decode tok/s"])
    for name, side in (("fp32", fp32), ("int8", int8)):
        table.add(name, side["load_s"], side["prefill_s"], side["decode_tok_s"])
    first = agreed["first_difference"]
    notes = [
        (
            f"greedy agreement with fp32 over {agreed['compared_tokens']} tokens: "
            + ("identical" if first is None else f"first difference at token {first}")
            + f", {agreed['same_positions']:.0%} of positions equal"
        ),
        f"int8 kernels: {next((k for k in int8['kernels'] if k.startswith('int8')), 'not in use')}",
    ]
    return Outcome(results, table, notes)

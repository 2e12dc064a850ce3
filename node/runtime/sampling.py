"""Sampling a token from a step's logits: temperature, and nucleus (top-p) over a large vocabulary.

mlx-lm's `apply_top_p` sorts the whole vocabulary every step: on Gemma 3's 262,144 entries that
took ~33 ms on this project's CPU, four times the decode step itself, and its `mx.compile` JITs a
kernel (~0.5 s) the first time each top_p value is seen. The nucleus is almost always a few
tokens, so `nucleus` looks for it among the tokens within MARGIN of the most likely one (one
comparison pass), then among the `CANDIDATES` most likely (one partition pass), sorting only
those; where they hold less than top_p of the probability it falls back to mlx-lm's full sort.
Either way the kept set is mlx-lm's: the smallest run of most likely tokens whose probability
reaches top_p (up to float rounding at the boundary). The token is drawn by inverse
CDF with one number from MLX's generator (so `seed` stays reproducible) at the request's
temperature, from the nucleus or from every token when top_p does not limit them.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import apply_top_p
from mlx_lm.sample_utils import make_sampler as mlx_lm_sampler

CANDIDATES = 1024
MARGIN = 10.0  # logits this far below the best: each e^-10 as likely
SPAN = 1024  # entries per block of the inverse-CDF search

Sampler = Callable[[mx.array], mx.array]


def make_sampler(temperature: float, top_p: float) -> Sampler:
    """Logits (B, V) -> token ids (B,): greedy at temperature 0, else drawn at `temperature` from
    the top_p nucleus (from every token when top_p is not in (0, 1))."""
    if temperature == 0:
        return mlx_lm_sampler(0.0)
    return lambda logits: mx.array([_draw(row, temperature, top_p) for row in logits])


def nucleus(logits: np.ndarray, top_p: float) -> np.ndarray | None:
    """Ids of the top_p nucleus of one row of logits, most likely first; None where no candidate
    set (`_candidates`) holds it."""
    top = logits.max()
    total = np.exp(logits - top, dtype=np.float64).sum()
    for ids in _candidates(logits, top):
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        best = logits[ids]
        probs = np.exp(best - top, dtype=np.float64) / total
        before = np.cumsum(probs) - probs  # the probability of the tokens ahead of each
        kept = int((before < top_p).sum())
        if kept == len(ids) and len(ids) < logits.shape[-1]:
            continue  # the nucleus may reach past the candidates
        threshold = best[kept - 1]
        if kept < len(ids) and best[-1] >= threshold:
            continue  # a tie at the threshold may continue past the candidates
        return ids[best >= threshold]
    return None


def _candidates(logits: np.ndarray, top: float):
    """Ever larger sets of the most likely tokens, each holding every token more likely than its
    least likely one: those within MARGIN of the best logit `top` (one comparison pass: a few
    hundred tokens of a model's peaked distribution), then the CANDIDATES most likely (a partition
    pass)."""
    near = np.flatnonzero(logits >= top - MARGIN)
    count = min(CANDIDATES, logits.shape[-1])
    if len(near) <= count:
        yield near
        if len(near) == count:
            return
    yield np.argpartition(logits, -count)[-count:]


def _draw(row: mx.array, temperature: float, top_p: float) -> int:
    logits = np.asarray(row.astype(mx.float32))
    if not 0 < top_p < 1:
        return _inverse_cdf(logits / temperature)
    ids = nucleus(logits, top_p)
    if ids is None:  # mlx-lm's full sort: -inf outside the nucleus
        return _inverse_cdf(np.asarray(apply_top_p(row[None], top_p)[0]) / temperature)
    return int(ids[_inverse_cdf(logits[ids] / temperature)])


def _inverse_cdf(scaled: np.ndarray) -> int:
    """An index drawn with probability softmax(scaled): one uniform number from MLX's generator
    against the running sum, found per block of SPAN entries, then within the block
    (mx.random.categorical draws a Gumbel number per entry: ~4 ms for 262,144 of them, half a
    decode step; a float64 cumsum of all of them ~2.7 ms)."""
    weights = np.exp(scaled - scaled.max())
    blocks = np.add.reduceat(weights, np.arange(0, len(weights), SPAN), dtype=np.float64)
    ends = np.cumsum(blocks)
    target = mx.random.uniform().item() * ends[-1]
    block = min(int(np.searchsorted(ends, target, side="right")), len(ends) - 1)
    inside = weights[block * SPAN : (block + 1) * SPAN]
    offset = target - (ends[block - 1] if block else 0.0)
    running = np.cumsum(inside, dtype=np.float64)
    index = int(np.searchsorted(running, offset, side="right"))
    if index >= len(inside):  # rounding between the two sums: the block's last likely entry
        index = int(np.flatnonzero(inside)[-1])
    return block * SPAN + index

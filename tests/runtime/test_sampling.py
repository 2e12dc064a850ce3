"""Nucleus (top-p) sampling over a large vocabulary: the kept set is mlx-lm's, found without
sorting the vocabulary, and tokens are drawn from it in proportion to their probability."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import apply_top_p

from node.runtime import sampling
from node.runtime.sampling import make_sampler, nucleus


def _mlx_lm_kept(logits: np.ndarray, top_p: float) -> set[int]:
    filtered = np.array(apply_top_p(mx.array(logits)[None], top_p))[0]
    return set(np.flatnonzero(np.isfinite(filtered)).tolist())


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95])
@pytest.mark.parametrize("seed", range(4))
def test_the_nucleus_is_mlx_lms_kept_set(top_p, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(262144) * 6).astype(np.float32)  # peaked, as a model's are
    logits[rng.integers(0, 262144, 5)] += 12
    ids = nucleus(logits, top_p)
    assert ids is not None and len(ids) < sampling.CANDIDATES
    ours, theirs = set(ids.tolist()), _mlx_lm_kept(logits, top_p)
    # The same set, but for a token at the boundary where float rounding of the sums decides.
    differing = ours ^ theirs
    assert len(differing) <= 1 and all(logits[t] == min(logits[list(ours | theirs)]) for t in differing)
    assert list(logits[ids]) == sorted(logits[ids], reverse=True)


def test_a_wider_distribution_finds_the_nucleus_among_the_partitioned_candidates(monkeypatch):
    logits = (np.random.default_rng(5).standard_normal(262144) * 3).astype(np.float32)
    assert (logits >= logits.max() - sampling.MARGIN).sum() > sampling.CANDIDATES  # past the margin set
    monkeypatch.setattr(sampling, "apply_top_p", None)  # no fallback to the full sort
    ids = nucleus(logits, 0.5)
    assert ids is not None and 1 < len(ids) < sampling.CANDIDATES
    differing = set(ids.tolist()) ^ _mlx_lm_kept(logits, 0.5)
    assert len(differing) <= 1


def test_a_flat_distribution_falls_back_to_the_full_sort():
    logits = np.random.default_rng(0).standard_normal(262144).astype(np.float32)
    assert nucleus(logits, 0.9) is None  # ~160k tokens hold 90%: past the candidates
    token = make_sampler(1.0, 0.9)(mx.array(logits)[None])
    assert token.shape == (1,) and int(token.item()) in _mlx_lm_kept(logits, 0.9)


@pytest.mark.parametrize(
    "top_p, temperature, expected",
    [
        (0.75, 1.0, [0.5 / 0.8, 0.3 / 0.8, 0, 0]),  # keeps 0.5 and 0.3: 0.8 reaches 0.75
        (1.0, 1.0, [0.5, 0.3, 0.15, 0.05]),  # every token
        (1.0, 0.5, [p * p / 0.365 for p in (0.5, 0.3, 0.15, 0.05)]),  # p^(1/T), normalized
    ],
)
def test_tokens_are_drawn_in_proportion(top_p, temperature, expected):
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = np.full(5000, -1e9, np.float32)
    logits[: len(probs)] = [math.log(p) for p in probs]
    sampler = make_sampler(temperature, top_p)
    mx.random.seed(1)
    drawn = np.array([int(sampler(mx.array(logits)[None]).item()) for _ in range(3000)])
    shares = [(drawn == token).mean() for token in range(len(probs))]
    assert set(drawn.tolist()) <= {t for t, share in enumerate(expected) if share > 0}
    assert all(abs(share - want) < 0.03 for share, want in zip(shares, expected, strict=True)), shares


def test_draws_find_likely_tokens_in_any_block_of_the_vocabulary():
    where, probs = [5, 1500, 3100, 4999], [0.4, 0.3, 0.2, 0.1]  # four blocks of the search, the last partial
    logits = np.full(5000, -1e9, np.float32)
    logits[where] = [math.log(p) for p in probs]
    sampler = make_sampler(1.0, 1.0)
    mx.random.seed(2)
    drawn = np.array([int(sampler(mx.array(logits)[None]).item()) for _ in range(3000)])
    assert set(drawn.tolist()) == set(where)
    assert all(abs((drawn == t).mean() - p) < 0.03 for t, p in zip(where, probs, strict=True))


def test_a_seed_draws_the_same_tokens_and_a_batch_one_per_row():
    logits = mx.array(np.random.default_rng(3).standard_normal((3, 262144)).astype(np.float32) * 8)
    sampler = make_sampler(0.7, 0.9)
    mx.random.seed(7)
    first = sampler(logits).tolist()
    mx.random.seed(7)
    assert sampler(logits).tolist() == first and len(first) == 3

"""Restore or recompute: the cost model's fit and its choices."""

from __future__ import annotations

import pytest

from node.memory.cost_model import CostModel

# Measured on an H200 with a Gemma 3 12B-shaped model (docs/results/h200-gemma3-12b.json)
PREFILL = [(2048, 0.1209), (8192, 0.6395)]
WARM = [(469_762_048, 0.1474), (872_415_232, 0.2396)]
COLD = [(469_762_048, 0.3312), (872_415_232, 0.6291)]


def test_fit_reproduces_its_samples():
    model = CostModel.fit(PREFILL, WARM, COLD)
    for tokens, seconds in PREFILL:
        assert model.prefill_s(tokens) == pytest.approx(seconds, rel=1e-6)
    for nbytes, seconds in WARM:
        assert model.restore_s(nbytes) == pytest.approx(seconds, rel=1e-6)
    for nbytes, seconds in COLD:  # these two lie on a line through a negative fixed cost: a mean rate
        assert model.restore_s(nbytes, cold=True) == pytest.approx(seconds, rel=0.05)
    assert model.cold_fixed_s == 0.0


def test_small_prefixes_are_recomputed_long_ones_restored():
    model = CostModel.fit(PREFILL, WARM, COLD)
    small = model.choose(2048, 2048, 469_762_048)
    assert not small.restore and small.estimated_s == pytest.approx(0.1209, rel=1e-6)
    long = model.choose(32768, 32768, 2_483_027_968)
    assert long.restore and long.estimated_s < long.alternative_s
    assert not model.choose(8192, 8192, 872_415_232, cold=True).restore


def test_a_partial_prefix_pays_for_the_rest_of_the_prompt():
    model = CostModel.fit(PREFILL, WARM)
    choice = model.choose(32768, 16384, 1_300_000_000)
    assert choice.restore
    assert choice.estimated_s == pytest.approx(model.restore_s(1_300_000_000) + model.prefill_s(32768, 16384))


def test_near_break_even_recomputes():
    model = CostModel(1e-4, 0.0, 0.0, 1e9, 0.0, 1e9, margin=0.8)
    assert not model.choose(1000, 1000, int(0.09e9)).restore  # 0.09 s vs 0.1 s: not clearly faster
    assert model.choose(1000, 1000, int(0.05e9)).restore


def test_prefixes_below_the_calibrated_range_are_recomputed():
    model = CostModel.fit(PREFILL, WARM)
    assert not model.choose(1024, 1000, 1).restore

"""Fixtures of the model tests that use node's CPU extension."""

from __future__ import annotations

import pytest

from node.model import cpu_extension


@pytest.fixture(scope="session")
def ops():
    module = cpu_extension.extension()
    assert module is not None, cpu_extension.failure()
    return module


@pytest.fixture
def float_activations(ops):
    """The int8 products on a path that keeps activations in float (the VNNI path, for decode steps
    and prefill alike, quantizes them per block, as llama.cpp does, which moves logits by up to
    ~1%): for comparisons of one graph against another that should agree to float rounding."""
    used = ops.isa()
    ops.use_isa(next(isa for isa in ops.supported_isas() if isa != "avx512vnni"))
    yield
    ops.use_isa(used)

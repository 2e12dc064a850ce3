"""The BLAS binding: OpenBLAS found and bound, its thread count under the node's control."""

from __future__ import annotations

import sys

import pytest

from node.model import blas

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the BLAS binding is Linux-only")


def test_openblas_is_bound_through_the_shim():
    assert blas.bind_fast_blas() is not None
    assert blas.thin_calls() is not None


def test_threads_setting_reaches_openblas():
    blas.set_blas_threads(1)
    assert blas._openblas.scipy_openblas_get_num_threads() == 1
    blas.set_blas_threads(2)
    assert blas._openblas.scipy_openblas_get_num_threads() == 2

"""The layering holds by structure: the protocol layers load no mlx, and mlx loaded too early is told."""

from __future__ import annotations

import subprocess
import sys

import pytest

EDGE_MODULES = (
    "node",
    "node.config",
    "node.cli.main",
    "node.server.app",
    "node.a2a.server",
    "node.anthropic.api",
    "node.openai.api",
    "node.network.node_network",
    "skills",
)


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("module", EDGE_MODULES)
def test_importing_an_edge_module_loads_no_mlx(module):
    result = python(f"import sys, {module}; print('mlx' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_mlx_imported_before_the_blas_binding_is_reported():
    if sys.platform != "linux":
        pytest.skip("the BLAS binding is Linux-only")
    result = python("import logging; logging.basicConfig(); import mlx.core; import node.model")
    assert result.returncode == 0, result.stderr
    assert "imported before node.model bound the fast BLAS" in result.stderr

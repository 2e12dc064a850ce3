from __future__ import annotations

import socket
from pathlib import Path

import pytest

import node.model  # noqa: F401  (binds the fast BLAS before any test module imports mlx)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """Converted tiny models go to a per-session folder; the default model keeps the user cache."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    from tests.tiny_models import write_tiny_gguf

    path = tmp_path_factory.mktemp("tiny") / "tiny-gemma3.gguf"
    write_tiny_gguf(path)
    return path


@pytest.fixture(scope="session")
def tiny_engine(tiny_gguf, model_cache):
    from node.model.engine import Engine

    return Engine.load(str(tiny_gguf), progress=lambda message: None, cache_root=model_cache)


@pytest.fixture(scope="session")
def engine():
    """The real default model (Gemma 3 270M from PyPI)."""
    from node.model.engine import Engine

    return Engine.load("default", progress=lambda message: None)


def pytest_sessionfinish(session, exitstatus) -> None:
    session.config._node_exit_status = int(exitstatus)


def pytest_unconfigure(config) -> None:
    # MLX used from the model worker thread can abort in its C++ destructors at exit
    # (ml-explore/mlx issue 3126); leave before they run, keeping pytest's own exit status.
    from node.cli.main import exit_without_mlx_teardown

    exit_without_mlx_teardown(getattr(config, "_node_exit_status", 0))

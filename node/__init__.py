"""A2A network node whose LLM agents keep their KV caches across tasks, restarts and sessions.

The public API, loaded lazily: `import node` loads no mlx. The layers, in dependency order:
`node.model` (specs, GGUF import, engine, caches, CPU kernels; binds the fast BLAS on import)
<- `node.runtime` (generation, batching, the MLX worker thread) <- `node.memory` (agents and
their checkpoints) <- `node.a2a`, `node.anthropic`, `node.openai`, `node.network` (protocol
adapters) <- `node.server` (the app) <- `node.cli`.

    from node import NodeConfig, create_app
    app = create_app(NodeConfig(port=8000))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "NodeConfig": "node.config",
    "NodeError": "node.errors",
    "Engine": "node.model.engine",
    "AgentManager": "node.memory.agents",
    "CheckpointStore": "node.memory.checkpoint",
    "create_app": "node.server.app",
}
__all__ = [
    "AgentManager",
    "CheckpointStore",
    "Engine",
    "NodeConfig",
    "NodeError",
    "__version__",
    "create_app",
]

if TYPE_CHECKING:
    from node.config import NodeConfig
    from node.errors import NodeError
    from node.memory.agents import AgentManager
    from node.memory.checkpoint import CheckpointStore
    from node.model.engine import Engine
    from node.server.app import create_app


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'node' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

"""The memory layer: persistent agents, their verified checkpoints and the one agent-id scheme."""

import node.model  # noqa: F401  (binds the fast BLAS before mlx loads)

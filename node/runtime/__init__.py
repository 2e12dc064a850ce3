"""The runtime layer: KV caches, generation, batched decode and the one thread that owns MLX state."""

import node.model  # noqa: F401  (binds the fast BLAS before mlx loads)

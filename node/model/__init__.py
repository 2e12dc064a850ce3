"""The model layer: model specs, GGUF import, the engine (model, tokenizer, chat template), CPU kernels.

Importing this package binds MLX's CPU backend to the fast BLAS before any module of the node
imports mlx: `node.runtime` and `node.memory` import it first, so the binding holds by structure,
not by the order of imports in an entry point. A process that imported mlx earlier is told so.
"""

from node.model.blas import bind_fast_blas

bind_fast_blas()

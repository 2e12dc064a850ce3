"""One decode step for several agents at once, each keeping its own cache.

A decode step on this hardware is dominated by reading the weights, so B sequences in one forward
pass cost little more than one. mlx-lm's batch caches would need every agent's cache merged into
one padded buffer and split back out; instead `BatchedLayerCache` presents a layer's per-agent
caches to the unchanged mlx-lm model as one batch: each agent's cache is updated in place, and only
the keys/values attention needs this step are left-padded and stacked (a mask hides the padding),
or, where the attention kernel takes sequences of different lengths (node.model.cpu_kernels on the
CPU), handed over per agent as they are. RoPE takes the per-sequence offsets as an array.
"""

from __future__ import annotations

import mlx.core as mx

from node.model import cpu_kernels, kv_cache
from node.runtime.generation import Sequence


class BatchedLayerCache:
    def __init__(self, caches: list, offset: mx.array | None = None) -> None:
        """`offset`: the sequences' positions, when the caller shares one array among layers."""
        self.caches = caches
        self.offset = mx.array([c.offset for c in caches]) if offset is None else offset
        self.lengths = [c.visible_after_update() for c in caches]
        self.width = max(self.lengths)

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None) -> mx.array:
        columns = mx.arange(self.width)[None]
        starts = mx.array([self.width - n for n in self.lengths])[:, None]
        return (columns >= starts)[:, None, None, :]  # (B, 1, 1, width)

    def update_in_place(self, keys: mx.array | list, values: mx.array | list) -> tuple[list, list, list]:
        """Each agent's cache updated in place; its buffers and the range of them attention reads
        (for a kernel that takes sequences of different lengths: no padding, no copies). `keys` and
        `values`: the batch's (B, ...) arrays, or one (1, ...) array per agent already."""
        if not isinstance(keys, list):
            keys = [keys[i : i + 1] for i in range(len(self.caches))]
            values = [values[i : i + 1] for i in range(len(self.caches))]
        updated = [
            kv_cache.update_in_place(c, k, v) for c, k, v in zip(self.caches, keys, values, strict=True)
        ]
        return [k for k, _, _ in updated], [v for _, v, _ in updated], [r for _, _, r in updated]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        padded_keys, padded_values = [], []
        for i, cache in enumerate(self.caches):
            k, v = cache.update_and_fetch(keys[i : i + 1], values[i : i + 1])
            pad = self.width - k.shape[2]
            if pad:
                k = mx.pad(k, [(0, 0), (0, 0), (pad, 0), (0, 0)])
                v = mx.pad(v, [(0, 0), (0, 0), (pad, 0), (0, 0)])
            padded_keys.append(k)
            padded_values.append(v)
        return mx.concatenate(padded_keys), mx.concatenate(padded_values)


def batched_step(model, sequences: list[Sequence]) -> None:
    """Feed every sequence its next input in one forward pass and accept the sampled tokens."""
    layers = len(sequences[0].context.caches)
    offset = mx.array([s.context.caches[0].offset for s in sequences])  # every layer's
    views = [BatchedLayerCache([s.context.caches[i] for s in sequences], offset) for i in range(layers)]
    inputs = mx.array([[s.next_input] for s in sequences])
    logits = model(inputs, cache=views)[:, -1, :]
    if all(s.greedy for s in sequences):  # one argmax and one transfer for the batch
        tokens = cpu_kernels.argmax(logits).tolist()
    else:
        sampled = [s.sample(logits[i : i + 1]) for i, s in enumerate(sequences)]
        mx.eval(sampled)
        tokens = [t.item() for t in sampled]
    for sequence, token in zip(sequences, tokens):
        sequence.accept(token)

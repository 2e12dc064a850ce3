"""Token prefixes: how much of a new prompt an earlier one already covers (no mlx needed)."""

from __future__ import annotations


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n

"""What a generation reports: text as it is decoded, prefill progress, and its `Completion`.

`AgentManager.stream` yields `TextDelta` and `PrefillProgress` events and ends with the
`Completion`; consumers tell them apart with a `match` on these classes. Plain data, no mlx:
the protocol layers import it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TextDelta:
    """Text decoded since the last delta (never half a character or part of a stop string)."""

    text: str


@dataclass(frozen=True)
class PrefillProgress:
    """`done` of the `total` prompt tokens to prefill are in the cache."""

    done: int
    total: int


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int
    prefilled_tokens: int
    generated_tokens: int
    prefill_s: float
    generate_s: float
    restore_s: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "eos" | "length" | "stop" | "cancelled"
    stop_sequence: str | None
    usage: Usage

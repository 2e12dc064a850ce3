"""Restore or recompute: pick, per request and per prefix length, whichever is faster.

On a fast GPU a restore is not free: at 2k tokens of a 12B model, reading the KV from disk can take
longer than prefilling the tokens again. The model here predicts both from a few measurements of
this machine and this model:

    prefill_s(n)        = n * (a + b * n)          chunked prefill of n tokens from position 0
                                                   (b: attention's cost growing with context)
    prefill_s(p -> n)   = prefill_s(n) - prefill_s(p)
    restore_s(bytes)    = fixed + bytes / bandwidth     (warm: page cache; cold: the disk)

`choose` compares serving a prompt of `n` tokens whose first `p` are stored (their KV `bytes`) by
restoring them and prefilling the rest, against prefilling all `n`. A prefix shorter than
`min_restore_tokens` (no measurement there) is recomputed, and so is one whose predicted restore is
not clearly faster (`margin`): a wrong pick near the break-even point then costs nothing. `fit` calibrates from timings taken on
the running machine (the bench measures them; a node can measure two prefill chunks and one restore
at start).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Choice:
    restore: bool
    restore_tokens: int  # tokens served from the checkpoint (0: recompute everything)
    estimated_s: float
    alternative_s: float  # the estimate for the path not taken


@dataclass(frozen=True)
class CostModel:
    prefill_a_s: float  # seconds per token
    prefill_b_s: float  # seconds per token per token of context
    warm_fixed_s: float
    warm_bytes_per_s: float
    cold_fixed_s: float
    cold_bytes_per_s: float
    min_restore_tokens: int = 0
    margin: float = 0.8  # restore only when predicted at most this share of recompute

    def prefill_s(self, tokens: int, start: int = 0) -> float:
        def whole(n: int) -> float:
            return n * (self.prefill_a_s + self.prefill_b_s * n)

        return max(0.0, whole(tokens) - whole(start))

    def restore_s(self, nbytes: int, cold: bool = False) -> float:
        if cold:
            return self.cold_fixed_s + nbytes / self.cold_bytes_per_s
        return self.warm_fixed_s + nbytes / self.warm_bytes_per_s

    def choose(self, prompt_tokens: int, stored_tokens: int, stored_bytes: int, cold: bool = False) -> Choice:
        """Serve `prompt_tokens` whose first `stored_tokens` (`stored_bytes` of KV to read) are on disk."""
        recompute = self.prefill_s(prompt_tokens)
        if stored_tokens < max(1, self.min_restore_tokens):
            return Choice(False, 0, recompute, recompute)
        restore = self.restore_s(stored_bytes, cold) + self.prefill_s(prompt_tokens, stored_tokens)
        if restore <= self.margin * recompute:
            return Choice(True, stored_tokens, restore, recompute)
        return Choice(False, 0, recompute, restore)

    @classmethod
    def fit(
        cls,
        prefill: list[tuple[int, float]],
        warm: list[tuple[int, float]],
        cold: list[tuple[int, float]] | None = None,
    ) -> CostModel:
        """From (tokens, seconds) prefill timings and (bytes, seconds) restore timings."""
        a, b = _fit_prefill(prefill)
        warm_fixed, warm_bw = _fit_line(warm)
        cold_fixed, cold_bw = _fit_line(cold) if cold else (warm_fixed, warm_bw)
        return cls(a, b, warm_fixed, warm_bw, cold_fixed, cold_bw, min(n for n, _ in prefill))

    def as_dict(self) -> dict:
        return {
            "prefill_s_per_token": self.prefill_a_s,
            "prefill_s_per_token_per_context_token": self.prefill_b_s,
            "warm_fixed_s": self.warm_fixed_s,
            "warm_GB_per_s": self.warm_bytes_per_s / 1e9,
            "cold_fixed_s": self.cold_fixed_s,
            "cold_GB_per_s": self.cold_bytes_per_s / 1e9,
            "min_restore_tokens": self.min_restore_tokens,
            "margin": self.margin,
        }


def _fit_prefill(samples: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares of s/n = a + b*n (a, b >= 0)."""
    if len(samples) == 1:
        n, s = samples[0]
        return s / n, 0.0
    xs = [n for n, _ in samples]
    ys = [s / n for n, s in samples]
    slope, intercept = _least_squares(xs, ys)
    if slope < 0:
        return sum(s for _, s in samples) / sum(xs), 0.0
    return max(intercept, 0.0), slope


def _fit_line(samples: list[tuple[int, float]]) -> tuple[float, float]:
    """seconds = fixed + bytes / bandwidth (fixed >= 0)."""
    if len(samples) == 1:
        nbytes, s = samples[0]
        return 0.0, nbytes / s
    slope, intercept = _least_squares([b for b, _ in samples], [s for _, s in samples])
    if intercept < 0 or slope <= 0:
        total_b, total_s = sum(b for b, _ in samples), sum(s for _, s in samples)
        return 0.0, total_b / total_s
    return intercept, 1.0 / slope


def _least_squares(xs: list[float], ys: list[float]) -> tuple[float, float]:
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        return 0.0, mean_y
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var
    return slope, mean_y - slope * mean_x


class ObservedCosts:
    """The cost model a running node keeps from its own work: every prefill it runs (tokens from
    `start` to `end`, seconds) and every restore (bytes read, seconds). Until it has seen prefills
    of two lengths and restores of two sizes it restores (what a node without it does); from then
    on `choose` uses the model fitted to the latest samples. A recomputed prefix is a prefill
    sample too, so the model keeps learning whichever path it picks."""

    SAMPLES = 64
    MIN_PREFILL_TOKENS = 128  # shorter prefills measure dispatch, not the model

    def __init__(self) -> None:
        self.prefills: deque[tuple[int, int, float]] = deque(maxlen=self.SAMPLES)
        self.restores: deque[tuple[int, float]] = deque(maxlen=self.SAMPLES)
        self._model: CostModel | None = None

    def observe_prefill(self, start: int, end: int, seconds: float) -> None:
        if end - start >= self.MIN_PREFILL_TOKENS and seconds > 0:
            self.prefills.append((start, end, seconds))
            self._model = None

    def observe_restore(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self.restores.append((nbytes, seconds))
            self._model = None

    def model(self) -> CostModel | None:
        if self._model is None and self._calibrated():
            a, b = _fit_prefill_spans(list(self.prefills))
            fixed, bandwidth = _fit_line(list(self.restores))
            least = min(end - start for start, end, _ in self.prefills)
            self._model = CostModel(a, b, fixed, bandwidth, fixed, bandwidth, least)
        return self._model

    def choose(self, prompt_tokens: int, stored_tokens: int, stored_bytes: int) -> Choice:
        model = self.model()
        if model is None:
            return Choice(True, stored_tokens, 0.0, 0.0)
        return model.choose(prompt_tokens, stored_tokens, stored_bytes)

    def _calibrated(self) -> bool:
        lengths = {end - start for start, end, _ in self.prefills}
        sizes = {nbytes for nbytes, _ in self.restores}
        return len(lengths) >= 2 and len(sizes) >= 2


def _fit_prefill_spans(samples: list[tuple[int, int, float]]) -> tuple[float, float]:
    """Least squares of seconds = a*(e - s) + b*(e^2 - s^2) over (s, e, seconds), a and b >= 0."""
    xs = [(e - s, e * e - s * s) for s, e, _ in samples]
    ys = [seconds for _, _, seconds in samples]
    s11 = sum(x1 * x1 for x1, _ in xs)
    s12 = sum(x1 * x2 for x1, x2 in xs)
    s22 = sum(x2 * x2 for _, x2 in xs)
    t1 = sum(x1 * y for (x1, _), y in zip(xs, ys))
    t2 = sum(x2 * y for (_, x2), y in zip(xs, ys))
    det = s11 * s22 - s12 * s12
    if det > 0:
        a, b = (t1 * s22 - t2 * s12) / det, (s11 * t2 - s12 * t1) / det
        if a >= 0 and b >= 0:
            return a, b
    return sum(ys) / sum(x1 for x1, _ in xs), 0.0  # tokens alone

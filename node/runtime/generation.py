"""Generation over an explicit, reusable KV cache.

A `CachedContext` is a list of per-layer caches plus the token ids whose keys and values they hold.
`generate` reuses the longest common prefix of that context and the new prompt, prefills only the
rest (in chunks), then decodes with greedy or temperature/top-p sampling until EOS, a stop string,
`max_tokens` or cancellation, streaming text through a callback.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors

from node.errors import PromptTooLong
from node.model import cpu_kernels, kv_cache
from node.runtime.events import Completion, Usage
from node.runtime.prefix import common_prefix_length
from node.runtime.sampling import make_sampler

PREFILL_CHUNK = 512
REPETITION_WINDOW = 64
TextCallback = Callable[[str], None]
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    # The prompt format's end-of-turn strings: they end a reply once it has begun (a base model may
    # open its answer with a blank line, which would otherwise end it empty).
    turn_stop: tuple[str, ...] = ()
    seed: int | None = None
    # Penalty on tokens the reply itself already used (its last REPETITION_WINDOW tokens, never the
    # prompt's): base models loop without one. None: no penalty.
    repetition_penalty: float | None = None


@dataclass
class CachedContext:
    caches: list
    tokens: list[int] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return kv_cache.nbytes(self.caches)


def reusable_prefix(context: CachedContext, prompt: list[int]) -> int:
    """How many leading prompt tokens the context can serve (at least one token must be fed)."""
    return min(common_prefix_length(context.tokens, prompt), len(prompt) - 1)


def rewind(context: CachedContext, position: int, fresh_caches: Callable[[], list]) -> int:
    """Trim the context to `position` tokens; start over when the caches cannot go that far back."""
    if position < len(context.tokens) and not kv_cache.can_trim_to(context.caches, position):
        context.caches, context.tokens = fresh_caches(), []
        return 0
    kv_cache.trim_to(context.caches, position)
    del context.tokens[position:]
    return position


def _prefill_chunk(model, context: CachedContext, chunk: list[int]) -> None:
    logits = model(mx.array(chunk)[None], cache=context.caches)
    if len(chunk) == 1:
        # One token goes through the decode step's kernels, which may write its keys and values
        # into the cache buffers inside an operation that only the logits depend on (evaluating
        # the buffers, already there, runs nothing); one position's logits cost one decode step.
        mx.eval(logits)
    mx.eval([c.keys for c in context.caches] + [c.values for c in context.caches])
    context.tokens.extend(chunk)


def prefill(model, context: CachedContext, tokens: list[int]) -> None:
    """Feed `tokens` to the model (no sampling), extending the context."""
    for start in range(0, len(tokens), PREFILL_CHUNK):
        _prefill_chunk(model, context, tokens[start : start + PREFILL_CHUNK])
    mx.clear_cache()


class _TextStream:
    """Incremental detokenization that never emits half a character or part of a stop string.

    Each token decodes only a short window (as vLLM's detokenizer does): the tokens since the last
    settled point, after the previous window's tokens as context (so that a tokenizer which drops
    a leading space at the start of a decode still yields the true continuation). Decoding every
    token so far each step made a reply's detokenization quadratic in its length.
    """

    def __init__(
        self, decode: Callable[[list[int]], str], stop: tuple[str, ...], turn_stop: tuple[str, ...] = ()
    ) -> None:
        self.decode, self.stop, self.turn_stop = decode, stop, turn_stop
        self.holdback = max((len(s) for s in stop + turn_stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stop_sequence: str | None = None
        self._begun: int | None = None  # where the reply's first non-blank character is
        self._searched = 0  # text before this (less a stop's length) holds no stop: settled, searched
        self._settled = ""  # the text of ids[: self._read]
        self._context = 0  # ids[self._context : self._read] are decoded again as context
        self._read = 0

    def _decode_window(self) -> None:
        context = self.decode(self.ids[self._context : self._read]) if self._read > self._context else ""
        window = self.decode(self.ids[self._context :])
        pending = window[len(context) :]
        self.text = self._settled + pending
        if pending and not pending.endswith("\ufffd"):  # whole characters: settle them
            self._settled = self.text
            self._context, self._read = self._read, len(self.ids)

    def add(self, token: int) -> str:
        self.ids.append(token)
        self._decode_window()
        found = self._first_stop()
        if found is not None:
            index, self.stop_sequence = found
            self.text = self.text[:index]
            return self.flush()
        safe = len(self.text) - self.holdback
        while safe > self.emitted and self.text[safe - 1] == "\ufffd":
            safe -= 1
        return self._emit(safe)

    def _first_stop(self) -> tuple[int, str] | None:
        """The earliest stop in the text (a turn stop only where it reaches past leading blanks),
        searched from where the last search's settled text ended."""
        start = max(0, self._searched - self.holdback)
        found = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if self._begun is None and self.text.strip():
            self._begun = len(self.text) - len(self.text.lstrip())
        if self._begun is not None:
            found += [
                (i, s)
                for s in self.turn_stop
                if (i := self.text.find(s, max(start, self._begun - len(s) + 1))) >= 0
            ]
        self._searched = len(self._settled)
        return min(found, default=None)

    def flush(self) -> str:
        return self._emit(len(self.text.rstrip("\ufffd")) if self.stop_sequence is None else len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta, self.emitted = self.text[self.emitted : upto], upto
        return delta


class Sequence:
    """One request's generation as a state machine: prefill in chunks, then one token per step.

    `generate` drives a single sequence; `node.runtime.batching` steps several in one forward pass.
    """

    def __init__(
        self,
        engine,
        context: CachedContext,
        prompt: list[int],
        params: SamplingParams,
        on_text: TextCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_prefill: ProgressCallback | None = None,
    ) -> None:
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) + params.max_tokens > engine.context_limit:
            raise PromptTooLong(
                f"{len(prompt)} prompt tokens + max_tokens {params.max_tokens} exceed the model's "
                f"context of {engine.context_limit} tokens"
            )
        self.engine, self.context, self.prompt, self.params = engine, context, prompt, params
        self.on_text, self.should_stop, self.on_prefill = on_text, should_stop, on_prefill
        self.started = time.perf_counter()
        self.cached = rewind(context, reusable_prefix(context, prompt), engine.make_caches)
        self.pending = prompt[self.cached : -1]
        self.prefilled = 0
        if params.seed is not None:
            mx.random.seed(params.seed)
        self.sampler = make_sampler(params.temperature, params.top_p)
        self.processors = make_logits_processors(
            repetition_penalty=params.repetition_penalty, repetition_context_size=REPETITION_WINDOW
        )
        self.stream = _TextStream(engine.decode, params.stop, params.turn_stop)
        self.generated: list[int] = []
        self.next_input = prompt[-1]
        self.finish_reason: str | None = None
        self.first_token_at: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.pending)

    def prefill_chunk(self) -> None:
        if self.should_stop is not None and self.should_stop():
            self.finish_reason = "cancelled"
            del self.pending[self.prefilled :]
            return
        chunk = self.pending[self.prefilled : self.prefilled + PREFILL_CHUNK]
        _prefill_chunk(self.engine.model, self.context, chunk)
        self.prefilled += len(chunk)
        if self.on_prefill is not None:
            self.on_prefill(self.prefilled, len(self.pending))

    def wants_step(self) -> bool:
        """False once finished; checks cancellation and the token budget first."""
        if self.finish_reason is None and self.should_stop is not None and self.should_stop():
            self.finish_reason = "cancelled"
        elif self.finish_reason is None and len(self.generated) >= self.params.max_tokens:
            self.finish_reason = "length"
        return self.finish_reason is None

    @property
    def greedy(self) -> bool:
        """Whether the next token is the argmax of the logits as they come (no processors)."""
        return self.params.temperature == 0 and not (self.processors and self.generated)

    def sample(self, logits: mx.array) -> mx.array:
        if self.greedy:
            return cpu_kernels.argmax(logits)
        if self.processors and self.generated:
            recent = mx.array(self.generated[-REPETITION_WINDOW:])
            for process in self.processors:
                logits = process(recent, logits)
        return self.sampler(logits)

    def accept(self, token: int) -> None:
        """Record the token sampled after feeding `next_input` (whose K/V are now cached)."""
        self.context.tokens.append(self.next_input)
        self.first_token_at = self.first_token_at or time.perf_counter()
        self.generated.append(token)
        if token in self.engine.eos_token_ids:
            self.finish_reason = "eos"
            return
        self._emit(self.stream.add(token))
        if self.stream.stop_sequence is not None:
            self.finish_reason = "stop"
        self.next_input = token

    def _emit(self, text: str) -> None:
        if text and self.on_text is not None:
            self.on_text(text)

    def finish(self) -> Completion:
        self._emit(self.stream.flush())
        finished = time.perf_counter()
        first = self.first_token_at or finished
        usage = Usage(
            prompt_tokens=len(self.prompt),
            cached_tokens=self.cached,
            prefilled_tokens=len(self.prompt) - self.cached,
            generated_tokens=len(self.generated),
            prefill_s=round(first - self.started, 4),
            generate_s=round(finished - first, 4),
        )
        reason = self.finish_reason or "length"
        return Completion(self.stream.text, tuple(self.generated), reason, self.stream.stop_sequence, usage)


def step(model, sequence: Sequence) -> None:
    """One decode step of a single sequence."""
    logits = model(mx.array([[sequence.next_input]]), cache=sequence.context.caches)[:, -1, :]
    sequence.accept(sequence.sample(logits).item())


def generate(
    engine, context: CachedContext, prompt: list[int], params: SamplingParams, **callbacks
) -> Completion:
    """Run one sequence to the end; `callbacks` are Sequence's on_text, should_stop, on_prefill."""
    sequence = Sequence(engine, context, prompt, params, **callbacks)
    while sequence.prefilling:
        sequence.prefill_chunk()
    mx.clear_cache()
    while sequence.wants_step():
        step(engine.model, sequence)
    return sequence.finish()

"""One chat turn on the node's agents, for every HTTP API (Anthropic Messages, OpenAI chat).

`ChatService.turn` renders the request, lets `ConversationIndex` pick the agent, streams the
manager's output through a `CallWatcher` (text that cannot open a tool call goes out at once; a
complete call stops generation) and ends with a `Reply`.

Stop reasons are honest: `max_tokens` only when the request's own `max_tokens` was reached. The
node caps every generation at `config.max_tokens` (`--max-tokens`); when that smaller cap ends a
turn, the turn ends as `end_turn` and `Reply.output_cap` carries the cap, which the APIs report in
usage (`server_output_cap`). Clients such as Claude Code read `max_tokens` as their own limit being
exceeded and fail; `end_turn` lets them finish their task with a shorter answer.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from node.anthropic.errors import ApiError, invalid_request
from node.anthropic.prompt import Prompt, render_prompt
from node.anthropic.request import ChatRequest, ToolCall
from node.anthropic.tools import CallWatcher
from node.memory.agent_ids import derived_agent_id
from node.memory.sessions import ConversationIndex
from node.runtime.events import Completion, PrefillProgress, TextDelta
from node.server.guards import RequestGate

MAX_PENDING = 16
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Reply:
    """One finished assistant turn, in the terms both chat APIs answer with."""

    text: str
    calls: tuple[ToolCall, ...]
    stop_reason: str  # "end_turn" | "max_tokens" | "stop_sequence" | "tool_use"
    stop_sequence: str | None
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    output_cap: int | None = None  # the node's cap, when it ended the turn before max_tokens


class ChatService:
    """The manager (or a callable returning it, None while the node starts), the config, the
    admission gate every API shares, and the conversation index."""

    def __init__(
        self, manager, config, max_pending: int = MAX_PENDING, gate: RequestGate | None = None
    ) -> None:
        self._manager = manager
        self.config = config
        self.gate = gate or RequestGate(max_pending)
        self._index: ConversationIndex | None = None

    @property
    def manager(self):
        manager = self._manager() if callable(self._manager) else self._manager
        if manager is None:
            raise ApiError(503, "api_error", "the node is still starting; retry shortly")
        return manager

    @property
    def index(self) -> ConversationIndex:
        if self._index is None:
            self._index = ConversationIndex(self.manager)
        return self._index

    def prompt(self, request: ChatRequest, caller: str = ANONYMOUS) -> Prompt:
        """The rendered prompt, refused when it and the turn's output budget exceed the context;
        its family is the caller's own (`family_for`)."""
        prompt = render_prompt(self.manager.engine, request)
        family_id = self.family_for(prompt.family_id, caller)
        prompt = replace(prompt, family_id=family_id, private=family_id != prompt.family_id)
        limit = self.manager.engine.context_limit
        budget = self.max_tokens(request)
        if len(prompt.tokens) + budget > limit:
            raise invalid_request(
                f"prompt is too long: {len(prompt.tokens)} tokens + max_tokens {budget} > {limit} maximum"
            )
        return prompt

    def family_for(self, family_id: str, caller: str) -> str:
        """Callers with different keys get different families, so one cannot learn through
        `cache_read_input_tokens` how much of its prompt another's conversation holds (prefix
        probing); `share_cache_across_keys` makes reuse across keys a choice. Callers without a
        key are indistinguishable and share. A private family's requests also carry it as their
        `scope`, so the agent manager never starts them from another key's stored prefix (nor the
        reverse): no figure and no timing tells one caller about another's conversations."""
        if caller == ANONYMOUS or self.config.share_cache_across_keys:
            return family_id
        return derived_agent_id(f"{family_id}.k", caller)

    def max_tokens(self, request: ChatRequest) -> int:
        return min(request.max_tokens, self.config.max_tokens)

    async def turn(self, request: ChatRequest, prompt: Prompt, api: str) -> AsyncIterator:
        """`TextDelta`s (tool calls held back), `PrefillProgress`, and finally the `Reply`."""
        params = self._sampling(request)
        index = self.index
        own = await index.shared(prompt.family_id, prompt.tokens) if prompt.private else None
        agent_id = await index.choose(prompt.family_id, prompt.tokens, request.session_id)
        watcher, cancel = CallWatcher(prompt.tools, bool(request.tools)), threading.Event()
        completion, held = None, None

        def metadata(done) -> dict:
            return {
                "api": api,
                "model": request.model,
                "family": prompt.family_id,
                "session": request.session_id,
                "prompt_tokens": len(prompt.tokens),
                "turns": len(request.turns),
            }

        try:
            scope = prompt.family_id if prompt.private else None  # a keyed caller's own cache
            stream = self.manager.stream(
                agent_id, prompt.tokens, params, metadata=metadata, cancel=cancel, scope=scope
            )
            async for item in stream:
                match item:
                    case TextDelta(text=delta):
                        text = watcher.feed(delta)
                        if watcher.complete():
                            cancel.set()  # the call is written: stop there, as the model would
                        if text:
                            yield TextDelta(text)
                    case Completion():
                        completion = item
                    case PrefillProgress():
                        yield item
            if completion is None:
                raise RuntimeError("the generation ended without a completion")
            if completion.finish_reason != "cancelled" or watcher.complete():
                # (a client that went away mid-prefill leaves a shorter cache: unknown here)
                held = list(prompt.tokens) + list(completion.token_ids)
        finally:
            index.release(prompt.family_id, agent_id, held, len(prompt.tokens))
        yield self._reply(request, params.max_tokens, watcher, completion, own)

    def _reply(
        self, request: ChatRequest, budget: int, watcher: CallWatcher, completion, own: int | None = None
    ) -> Reply:
        parsed = watcher.tools.parse(completion.text) if watcher.enabled else None
        calls = parsed.calls if parsed is not None else ()
        finish = completion.finish_reason
        if finish == "stop" and completion.stop_sequence not in request.stop_sequences:
            finish = "eos"  # the prompt format's own end of turn (a base model's next question)
        reason, cap = _stop_reason(finish, budget, request.max_tokens)
        usage = completion.usage
        return Reply(
            text=parsed.text if calls else completion.text,
            calls=calls,
            stop_reason="tool_use" if calls else reason,
            stop_sequence=completion.stop_sequence if reason == "stop_sequence" and not calls else None,
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=usage.cached_tokens if own is None else min(usage.cached_tokens, own),
            output_tokens=usage.generated_tokens,
            output_cap=None if calls else cap,
        )

    def _sampling(self, request: ChatRequest):
        from node.runtime.generation import SamplingParams  # model-side module: imports mlx

        return SamplingParams(
            max_tokens=self.max_tokens(request),
            temperature=request.temperature,
            top_p=request.top_p,
            stop=request.stop_sequences,
            turn_stop=self.manager.engine.chat_stop,
            repetition_penalty=self.manager.engine.prompt_format.repetition_penalty,
        )


def _stop_reason(finish_reason: str, budget: int, requested: int) -> tuple[str, int | None]:
    if finish_reason == "stop":
        return "stop_sequence", None
    if finish_reason == "length" and budget >= requested:
        return "max_tokens", None
    if finish_reason == "length":
        return "end_turn", budget
    return "end_turn", None

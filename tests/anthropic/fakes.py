"""A scripted fake of the agent manager and its engine, for the API layers' unit tests.

The fake keeps one token list per agent and reuses the longest common prefix; an agent it has not
seen starts from the longest prefix any agent holds (as the real manager's block tree does); it
replies with a fixed script, word by word, like the real manager's stream.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from node.errors import WorkerDead
from node.runtime.events import Completion, PrefillProgress, TextDelta, Usage


def _shared(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class FakeEngine:
    """Characters as tokens; the 'template' tags each turn, so prefixes behave like the real one."""

    info = SimpleNamespace(name="fake-model (scripted)", folder="/nonexistent")
    context_limit = 4000
    chat_stop: tuple[str, ...] = ()  # an instruction-tuned model's: its stop tokens end a turn
    prompt_format = SimpleNamespace(repetition_penalty=None)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return ([1] if add_bos else []) + [ord(c) for c in text]

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        roles = {"assistant": "model"}
        text = "".join(f"<{roles.get(m['role'], m['role'])}>{m['content'].strip()}</>" for m in messages)
        return self.encode(text + ("<model>" if add_generation_prompt else ""))


class FakeManager:
    """Replies with a fixed script, word by word; reuses the longest common prefix per agent."""

    def __init__(self, script: str = "Hello there, friend. Bye", fail_after: int | None = None) -> None:
        self.engine = FakeEngine()
        self.worker = SimpleNamespace(run=self._run)
        self.store = SimpleNamespace(list_agents=list)
        self.script = script.split(" ")
        self.scripts: list[str] = []  # replies for the next calls, in order, before `script`
        self.fail_after = fail_after
        self.calls: list[dict] = []
        self.contexts: dict[str, list[int]] = {}
        self.release = asyncio.Event()
        self.release.set()

    async def stream(
        self, agent_id, prompt, params, *, base_agent=None, metadata=None, cancel=None, scope=None
    ):
        self.calls.append({"agent_id": agent_id, "prompt": prompt, "params": params, "metadata": metadata})
        await self.release.wait()
        held = [self.contexts[agent_id]] if agent_id in self.contexts else list(self.contexts.values())
        cached = min(max((_shared(old, prompt) for old in held), default=0), len(prompt) - 1)
        yield PrefillProgress(done=1, total=2)
        text, finish, stop_sequence = "", "length", None
        script = self.scripts.pop(0).split(" ") if self.scripts else self.script
        for i, word in enumerate(script[: params.max_tokens]):
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            if self.fail_after is not None and i == self.fail_after:
                raise WorkerDead("the worker died")
            piece = word if i == 0 else " " + word
            if any(s in text + piece for s in params.stop):
                finish, stop_sequence = "stop", next(s for s in params.stop if s in text + piece)
                break
            text += piece
            yield TextDelta(piece)
        else:
            finish = "eos" if params.max_tokens > len(script) else "length"
        self.contexts[agent_id] = list(prompt) + [0] * len(text)
        generated = min(params.max_tokens, len(script))
        usage = Usage(len(prompt), cached, len(prompt) - cached, generated, prefill_s=0.0, generate_s=0.0)
        yield Completion(text, tuple([0] * len(text)), finish, stop_sequence, usage)

    async def _run(self, fn, *args):
        return fn(*args)

    async def tokens(self, agent_id: str) -> list[int]:
        return list(self.contexts.get(agent_id, []))

    async def generate(self, agent_id, prompt, params, **kwargs):
        async for item in self.stream(agent_id, prompt, params, **kwargs):
            result = item
        return result

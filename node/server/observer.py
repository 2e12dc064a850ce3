"""What the node is doing now and what it has done: live tasks, their progress, and their usage.

Every generation the node runs goes through `AgentManager.stream`; `ObservedManager` wraps the
manager the app hands to the skills and the chat APIs, so each task is seen as it flows: queued
(waiting for its agent or the model's thread), prefilling (chunks done of total), decoding (text
pieces streamed, about one per token), finished (its `Usage` goes to the metrics and the
`UsageLedger`). `TaskObserver` keeps the live tasks and wakes whoever waits for a change (the
dashboard's event stream). Nothing here touches MLX: it only watches the events the manager yields.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import asdict, dataclass

from node.runtime.events import Completion, PrefillProgress, TextDelta
from node.server.metrics import NodeMetrics
from node.server.usage import TaskUsage, UsageLedger

CHAT_LABEL = "chat"  # tasks of the Anthropic and OpenAI APIs, which name no skill


@dataclass
class LiveTask:
    task_id: int
    skill: str
    agent_id: str
    prompt_tokens: int
    started: float  # unix time
    state: str = "queued"  # queued | prefill | decode
    prefill_done: int = 0
    prefill_total: int = 0
    pieces: int = 0  # text deltas streamed so far (about one per token)

    def as_dict(self) -> dict:
        return {**asdict(self), "elapsed_s": round(time.time() - self.started, 2)}


class TaskObserver:
    """Live tasks by id; `changed()` wakes waiters after any task starts, moves on or ends."""

    def __init__(self, metrics: NodeMetrics, ledger: UsageLedger) -> None:
        self.metrics = metrics
        self.ledger = ledger
        self.tasks: dict[int, LiveTask] = {}
        self.version = 0
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()

    def start(self, skill: str, agent_id: str, prompt_tokens: int) -> LiveTask:
        task = LiveTask(next(self._ids), skill, agent_id, prompt_tokens, time.time())
        self.tasks[task.task_id] = task
        self._notify()
        return task

    def saw(self, task: LiveTask, item) -> None:
        match item:
            case PrefillProgress(done=done, total=total):
                task.state, task.prefill_done, task.prefill_total = "prefill", done, total
            case TextDelta():
                task.state, task.pieces = "decode", task.pieces + 1
            case Completion():
                self.metrics.task_finished(task.skill, item)
                usage = item.usage
                record = TaskUsage(
                    time.time(), task.skill, task.agent_id, usage.prompt_tokens, usage.cached_tokens,
                    usage.prefilled_tokens, usage.generated_tokens, usage.prefill_s, usage.generate_s,
                    usage.restore_s,
                )  # fmt: skip
                asyncio.get_running_loop().run_in_executor(None, self.ledger.record, record)
        self._notify()

    def finish(self, task: LiveTask) -> None:
        self.tasks.pop(task.task_id, None)
        self._notify()

    def queued(self) -> dict[str, int]:
        """Tasks waiting for their agent or the model's thread, by skill."""
        counts: dict[str, int] = {}
        for task in list(self.tasks.values()):
            if task.state == "queued":
                counts[task.skill] = counts.get(task.skill, 0) + 1
        return counts

    async def changed(self, after: int, timeout_s: float) -> int:
        """The version once it is past `after` (or the current one after `timeout_s`)."""
        if self.version == after:
            event = self._changed
            try:
                await asyncio.wait_for(event.wait(), timeout_s)
            except TimeoutError:
                pass
        return self.version

    def _notify(self) -> None:
        self.version += 1
        event, self._changed = self._changed, asyncio.Event()
        event.set()


class ObservedManager:
    """The agent manager, with every `stream` (and so `generate`) seen by the observer.

    Everything else is the manager's own (attribute access passes through), so code written against
    `AgentManager` works unchanged, whatever the manager grows.
    """

    def __init__(self, manager, observer: TaskObserver, skills: tuple[str, ...]) -> None:
        self.wrapped = manager
        self.observer = observer
        self.skills = skills

    def __getattr__(self, name: str):
        return getattr(self.wrapped, name)

    async def stream(self, agent_id: str, prompt: list[int], params, **kwargs):
        task = self.observer.start(self.label(kwargs.get("base_agent")), agent_id, len(prompt))
        try:
            async for item in self.wrapped.stream(agent_id, prompt, params, **kwargs):
                self.observer.saw(task, item)
                yield item
        finally:
            self.observer.finish(task)

    async def generate(self, agent_id: str, prompt: list[int], params, **kwargs) -> Completion:
        result = None
        async for item in self.stream(agent_id, prompt, params, **kwargs):
            result = item
        return result

    def label(self, base_agent: str | None) -> str:
        """A skill's tasks start from its base agent, named by the skill id."""
        return base_agent if base_agent in self.skills else CHAT_LABEL

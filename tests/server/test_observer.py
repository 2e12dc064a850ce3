"""The task observer: live tasks as the manager's events flow, and what a finished task leaves in
the metrics and the usage ledger. The scripted fake manager stands in for the model."""

from __future__ import annotations

from prometheus_client import generate_latest

from node.runtime.events import Completion
from node.runtime.generation import SamplingParams
from node.server.metrics import NodeMetrics
from node.server.observer import ObservedManager, TaskObserver
from node.server.usage import UsageLedger
from tests.anthropic.fakes import FakeManager


def observed(script: str = "one two three") -> tuple[ObservedManager, TaskObserver, FakeManager]:
    fake = FakeManager(script)
    observer = TaskObserver(NodeMetrics(), UsageLedger(None))
    return ObservedManager(fake, observer, ("technical_analysis",)), observer, fake


async def test_a_task_is_live_while_it_streams_and_leaves_its_usage():
    manager, observer, _ = observed()
    states = []
    stream = manager.stream("a1", [1, 2, 3], SamplingParams(max_tokens=8), base_agent="technical_analysis")
    async for item in stream:
        (task,) = observer.tasks.values()
        states.append((type(item).__name__, task.state, task.prefill_done, task.pieces))
        if isinstance(item, Completion):
            completion = item

    assert states == [
        ("PrefillProgress", "prefill", 1, 0),
        ("TextDelta", "decode", 1, 1),
        ("TextDelta", "decode", 1, 2),
        ("TextDelta", "decode", 1, 3),
        ("Completion", "decode", 1, 3),
    ]
    assert observer.tasks == {}
    assert completion.text == "one two three"
    metrics = generate_latest(observer.metrics.registry).decode()
    assert 'node_tasks_total{finish_reason="eos",skill="technical_analysis"} 1.0' in metrics
    assert 'node_prompt_tokens_total{skill="technical_analysis",source="prefilled"} 3.0' in metrics


async def test_tasks_without_a_skill_are_chat_and_the_wrapper_passes_the_rest_through():
    manager, observer, fake = observed("hi")
    version = observer.version
    completion = await manager.generate("anthropic-x", [1, 2], SamplingParams(max_tokens=4))

    assert completion.text == "hi"
    assert observer.version > version  # waiters were woken
    assert (
        manager.engine is fake.engine and await manager.tokens("anthropic-x") == fake.contexts["anthropic-x"]
    )
    metrics = generate_latest(observer.metrics.registry).decode()
    assert 'node_generated_tokens_total{skill="chat"} 1.0' in metrics


async def test_changed_returns_at_once_when_the_version_moved_and_waits_otherwise():
    _, observer, _ = observed()
    assert await observer.changed(-1, timeout_s=5) == observer.version
    assert await observer.changed(observer.version, timeout_s=0.05) == observer.version  # timed out

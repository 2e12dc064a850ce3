"""Coordination: the node's default skill; plans a request, delegates it, synthesizes the answers.

The plan is deterministic (the small base model plans poorly): one sub-task per expert skill,
phrased from the request. The sub-tasks run concurrently over A2A at peers that host those skills,
other nodes or this one through the same HTTP path (`node.network.peers`), each in a context derived from
the coordinator's contextId, so the experts' conversations persist too. The coordinator then
answers with its own persistent agent, the experts' views written after the request. The task's last
artifact, `delegation`, says which peer answered which sub-task with timings and usage, and what
is missing. Message metadata `"delegate": false` makes the coordinator answer alone.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, replace

from a2a.types import Part
from google.protobuf import struct_pb2
from google.protobuf.json_format import ParseDict

from node.a2a.executor import SkillExecutor, TurnRequest
from node.network.peers import REPORT_ARTIFACT, SubtaskResult

# Each expert gets the request as it is: its own instructions (a system prompt, or for a base
# model its playbook) say how to answer it.
EXPERT_SKILLS = ("technical_analysis", "business_analysis")
DELEGATE_KEY = "delegate"
STOP_POLL_S = 0.2
SUBTASK_NAMESPACE = uuid.UUID("5b0f4a52-6a43-4c1e-9a7e-2d6f1c0b8e11")


@dataclass(frozen=True)
class Subtask:
    skill: str
    question: str


VIEW_LABELS = dict(zip(EXPERT_SKILLS, ("Technical view", "Business view"), strict=True))


def _one_line(result: SubtaskResult) -> str:
    if result.answer is None or not result.answer.text.strip():
        return "(no answer: the expert was unavailable)"
    return " ".join(result.answer.text.split())


def plan(request_text: str) -> list[Subtask]:
    return [Subtask(skill, request_text) for skill in EXPERT_SKILLS]


def subtask_context(context_id: str, skill: str) -> str:
    """The expert's conversation for this coordinator conversation (the same one every turn).

    A UUID, because the a2a-sdk database task store keeps contextIds in 36 characters."""
    return str(uuid.uuid5(SUBTASK_NAMESPACE, f"{context_id}/{skill}"))


@dataclass(frozen=True)
class DelegationReport:
    results: tuple[SubtaskResult, ...]
    elapsed_s: float

    @property
    def missing(self) -> list[str]:
        return [r.skill for r in self.results if r.answer is None]

    def as_dict(self) -> dict:
        return {
            "elapsedSeconds": round(self.elapsed_s, 3),
            "missing": self.missing,
            "subtasks": [r.as_dict() for r in self.results],
        }

    def render(self) -> str:
        answered = len(self.results) - len(self.missing)
        head = (
            f"Delegation: {len(self.results)} sub-tasks in {self.elapsed_s:.1f} s, "
            f"{answered} answered, {len(self.missing)} missing"
        )
        return "\n".join([head, *(line for r in self.results for line in _render_result(r))])


def _render_result(result: SubtaskResult) -> list[str]:
    failed = [a for a in result.attempts if a.outcome != "completed"]
    earlier = [f"    {a.peer}: {a.outcome} after {a.elapsed_s:.1f} s ({a.detail})" for a in failed]
    if result.answer is None:
        why = "no peer answered" if result.attempts else "no peer hosts this skill"
        return [f"- {result.skill}: MISSING, {why}", *earlier]
    u = {k: int(v) for k, v in result.answer.usage.items() if k.endswith("Tokens")}
    numbers = (
        f"prompt {u.get('promptTokens', '?')} tokens, {u.get('cachedTokens', '?')} cached, "
        f"{u.get('generatedTokens', '?')} generated"
    )
    head = f"- {result.skill}: answered by {result.peer} in {result.attempts[-1].elapsed_s:.1f} s ({numbers})"
    return [head, *earlier]


class CoordinationExecutor(SkillExecutor):
    skill_id = "coordination"
    system_prompt = (
        "You are the coordinator of a network of expert agents (technical analysis, business "
        "analysis). Break the request into steps, use the experts' findings when they are given, "
        "and answer with a short, well-structured summary and next steps."
    )

    async def answer(self, request: TurnRequest, out, stop: threading.Event):
        report = await self.delegate(request, stop)
        completion = await super().answer(self.with_findings(request, report), out, stop)
        if report is not None and completion.finish_reason != "cancelled" and not stop.is_set():
            await out.add_artifact(
                [Part(text=report.render()), Part(data=_as_value(report))], REPORT_ARTIFACT
            )
        return completion

    async def delegate(self, request: TurnRequest, stop: threading.Event) -> DelegationReport | None:
        """Run the plan's sub-tasks concurrently at peers; None when delegation is off."""
        network = self.runtime.network
        delegator = network.delegator if network is not None else None
        if delegator is None or request.metadata.get(DELEGATE_KEY) is False:
            return None
        limits = {k: request.metadata[k] for k in ("max_tokens",) if k in request.metadata}
        started = time.monotonic()
        jobs = [
            asyncio.create_task(
                delegator.run(s.skill, s.question, subtask_context(request.context_id, s.skill), limits)
            )
            for s in plan(request.text)
        ]
        await _until_done_or_stopped(jobs, stop)
        results = tuple(
            job.result() for job in jobs if job.done() and not job.cancelled() and not job.exception()
        )
        return DelegationReport(results, time.monotonic() - started)

    @staticmethod
    def with_findings(request: TurnRequest, report: DelegationReport | None) -> TurnRequest:
        """The request followed by one line per expert's view, as the coordination playbook
        shows them (`Technical view: ...`); a view that did not arrive says so."""
        if report is None:
            return request
        views = [f"{VIEW_LABELS.get(r.skill, r.skill)}: {_one_line(r)}" for r in report.results]
        return replace(request, text="\n".join([request.text.strip(), *views]))


def _as_value(report: DelegationReport) -> struct_pb2.Value:
    return ParseDict(report.as_dict(), struct_pb2.Value())


async def _until_done_or_stopped(jobs: list[asyncio.Task], stop: threading.Event) -> None:
    """Wait for every job; if the task is cancelled meanwhile, cancel the ones still running."""
    pending = set(jobs)
    while pending:
        if stop.is_set():
            for job in pending:
                job.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            return
        _, pending = await asyncio.wait(pending, timeout=STOP_POLL_S)

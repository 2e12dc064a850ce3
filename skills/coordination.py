"""Coordination: the node's default skill; plans a request and answers it.

For now it answers with its own persistent agent. `delegate` is the seam where a later issue asks
other skills and peer nodes: whatever it returns is put in front of the coordinator's prompt.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

from node.a2a_executor import SkillExecutor, TurnRequest


@dataclass(frozen=True)
class Delegated:
    """An answer gathered from another agent (a local skill or a peer node)."""

    agent: str
    text: str


class CoordinationExecutor(SkillExecutor):
    skill_id = "coordination"
    system_prompt = (
        "You are the coordinator of a network of expert agents (technical analysis, business "
        "analysis). Break the request into steps, use the experts' findings when they are given, "
        "and answer with a short, well-structured summary and next steps."
    )

    async def answer(self, request: TurnRequest, out, stop: threading.Event):
        findings = await self.delegate(request, stop)
        return await super().answer(self.with_findings(request, findings), out, stop)

    async def delegate(self, request: TurnRequest, stop: threading.Event) -> list[Delegated]:
        """Ask other agents for what `request` needs; none are wired in yet."""
        return []

    @staticmethod
    def with_findings(request: TurnRequest, findings: list[Delegated]) -> TurnRequest:
        if not findings:
            return request
        notes = "\n\n".join(f"Findings from {f.agent}:\n{f.text}" for f in findings)
        return replace(request, text=f"{notes}\n\nRequest:\n{request.text}")

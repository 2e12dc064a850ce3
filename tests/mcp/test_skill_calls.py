"""A skill asked directly (MCP tools, the dashboard's box) holds a slot of the node's admission gate."""

from __future__ import annotations

import pytest

from node.a2a.executor import SkillRuntime
from node.a2a.skill_calls import SkillCallError, ask_skill
from node.config import NodeConfig
from node.server.guards import Overloaded, RequestGate
from skills import TechnicalAnalysisExecutor
from tests.mcp.test_skill_tools import ScriptedManager


def runtime_with(gate: RequestGate) -> SkillRuntime:
    return SkillRuntime(NodeConfig(skills=("technical_analysis",)), ScriptedManager("An answer."), gate=gate)


async def test_a_call_holds_a_slot_while_it_runs_and_gives_it_back():
    runtime = runtime_with(RequestGate(1))
    answer = await ask_skill(runtime, TechnicalAnalysisExecutor(runtime), "Why?", "ctx-1")
    assert (answer.text, answer.context_id, runtime.gate.active) == ("An answer.", "ctx-1", 0)


async def test_a_full_node_refuses_the_call():
    runtime = runtime_with(RequestGate(0))
    with pytest.raises(Overloaded):
        await ask_skill(runtime, TechnicalAnalysisExecutor(runtime), "Why?")
    assert runtime.gate.refused == 1 and not runtime.running


async def test_an_empty_question_is_refused_before_the_gate():
    runtime = runtime_with(RequestGate(1))
    with pytest.raises(SkillCallError):
        await ask_skill(runtime, TechnicalAnalysisExecutor(runtime), "  ")
    assert runtime.gate.active == 0

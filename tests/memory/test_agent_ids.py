"""Agent ids: hostile ids are refused, and folder names stay distinct where filesystems fold case."""

from __future__ import annotations

import pytest

from node.errors import InvalidAgentId
from node.memory.agent_ids import agent_dirname, validate_agent_id


@pytest.mark.parametrize(
    "agent_id", ["../etc", "a/b", "..", "", "x" * 129, "a\x00b", "/abs", "a b", "ünï", "a..b", ".hidden"]
)
def test_hostile_agent_ids_are_rejected(agent_id):
    with pytest.raises(InvalidAgentId):
        validate_agent_id(agent_id)


def test_ids_differing_in_case_get_distinct_folders():
    assert agent_dirname("Agent") != agent_dirname("agent")
    assert agent_dirname("Agent").lower() != agent_dirname("agent").lower()

"""A2A conversations: the history kept in an agent's metadata, rendered as chat turns."""

from __future__ import annotations

from node.a2a.conversation import Conversation, conversation_agent_id


def test_conversation_drops_an_unanswered_question_and_renders_turns():
    stored = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ]
    }
    conversation = Conversation.from_metadata(stored)
    assert conversation.turns == 1
    assert [m["content"] for m in conversation.prompt("sys", "d")] == ["sys", "a", "b", "d"]
    assert conversation.metadata("d", "e", skill="x")["messages"][-2:] == [
        {"role": "user", "content": "d"},
        {"role": "assistant", "content": "e"},
    ]
    assert conversation_agent_id("coordination", "any / context id ü").startswith("coordination.ctx-")

"""A2A contexts as persistent conversations.

An A2A `contextId` names one conversation per skill. Its persistent agent id is the skill id plus a
hash of the contextId (contextIds may hold any characters); the conversation's messages live in the
agent's checkpoint metadata and are re-rendered with the chat template every turn, so the rendered
prompt of turn N+1 extends the tokens of turn N and the agent's cache serves all of it but the new
user message. A new conversation starts from the skill's base agent, whose cache holds only the
rendered system prompt.

A conversation that outgrows the model's context drops its oldest turns (`fitted`): the turn that
does so says how many in its task metadata (`droppedTurns`), and the shorter history is what the
checkpoint keeps from then on.
"""

from __future__ import annotations

from dataclasses import dataclass

from node.memory.agent_ids import derived_agent_id

PROBES = ("A", "B")


def conversation_agent_id(skill_id: str, context_id: str) -> str:
    return derived_agent_id(f"{skill_id}.ctx", context_id)


def system_prefix_tokens(engine, system_prompt: str) -> list[int]:
    """The tokens every conversation of a skill starts with (the template may fold the system
    prompt into the first user turn, so the shared part is found by rendering two probes)."""
    renders = [engine.encode_chat(_opening(system_prompt, probe)) for probe in PROBES]
    first, second = renders
    n = next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))
    # The token before the divergence may merge differently with other user text: leave it out.
    return first[: max(n - 1, 0)]


def _opening(system_prompt: str, user_text: str) -> list[dict]:
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": user_text}]


@dataclass(frozen=True)
class Conversation:
    """The finished turns of one conversation (user/assistant pairs, in order)."""

    messages: tuple[dict, ...] = ()

    @classmethod
    def from_metadata(cls, metadata: dict | None) -> Conversation:
        messages = list((metadata or {}).get("messages") or [])
        # A turn that was cancelled or failed leaves its user message without a reply: drop it so
        # roles keep alternating (its tokens are simply not reused).
        while messages and messages[-1].get("role") != "assistant":
            messages.pop()
        return cls(tuple({"role": m["role"], "content": m["content"]} for m in messages))

    def prompt(self, system_prompt: str, user_text: str) -> list[dict]:
        return [
            {"role": "system", "content": system_prompt},
            *self.messages,
            {"role": "user", "content": user_text},
        ]

    def metadata(self, user_text: str, reply: str | None, **extra) -> dict:
        """Checkpoint metadata for the turn that asks `user_text` (and answered `reply`, if known)."""
        messages = [*self.messages, {"role": "user", "content": user_text}]
        if reply is not None:
            messages.append({"role": "assistant", "content": reply})
        return {**extra, "messages": messages}

    def fitted(self, engine, system_prompt: str, user_text: str, budget: int) -> tuple[Conversation, int]:
        """This conversation less its oldest turns, so that its prompt and `budget` generated
        tokens fit the model's context -> (conversation, turns dropped)."""
        limit = engine.context_limit - budget
        fitted = self
        while fitted.messages and len(engine.encode_chat(fitted.prompt(system_prompt, user_text))) > limit:
            fitted = Conversation(fitted.messages[2:])
        return fitted, self.turns - fitted.turns

    @property
    def turns(self) -> int:
        return len(self.messages) // 2

"""Which agent of a family serves a conversation, so that conversations never rewind each other.

A family is the agents under one system prompt (`family_id`, named by the API layer). Clients of
the HTTP APIs resend whole conversations and name none of them, except Claude Code, which names its
session. `ConversationIndex.choose` picks:

- a session's own agent (`<family>.s-<digest>`), which continues that session's history;
- else the free, session-less agent whose whole last prompt the new prompt extends (the longest
  such match): the same conversation, one turn on;
- else a new agent (the family's first is `family_id` itself); the agent manager starts it from the
  longest stored prefix of the prompt (shared KV blocks of any context), so the system prompt, or a
  longer shared start, is read from cache, not prefilled, and nothing is copied on disk;
- past `max_conversations` agents in a family, the free one sharing the longest prefix (rewound).

An agent chosen for a session-less request is busy until `release`; no other request continues
it meanwhile. The index keeps, per agent, the tokens its cache holds after its last request and that
request's prompt length; after a restart it is rebuilt from the checkpoints' metadata (`family`,
`session`, `prompt_tokens`), once per family.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field

from node.memory.agent_ids import derived_agent_id
from node.runtime.prefix import common_prefix_length

logger = logging.getLogger(__name__)
MAX_CONVERSATIONS = 32


@dataclass
class Conversation:
    agent_id: str
    tokens: list[int] = field(default_factory=list)  # what its cache holds after its last request
    prompt_tokens: int = 0  # that request's prompt length (0: unknown, continues nothing)
    session_id: str | None = None
    busy: bool = False
    last_used: float = field(default_factory=time.time)

    def shared(self, prompt: list[int]) -> int:
        return common_prefix_length(self.tokens, prompt)

    def continued_by(self, prompt: list[int]) -> bool:
        """The prompt is this conversation one turn on: it extends the whole last prompt."""
        return 0 < self.prompt_tokens < len(prompt) and self.shared(prompt) >= self.prompt_tokens


@dataclass(frozen=True)
class Choice:
    agent_id: str
    prefix_from: str | None = None


class ConversationIndex:
    def __init__(self, manager, max_conversations: int = MAX_CONVERSATIONS) -> None:
        self.manager = manager
        self.max_conversations = max_conversations
        self._families: dict[str, dict[str, Conversation]] = {}
        self._lock = asyncio.Lock()

    async def choose(self, family_id: str, prompt: list[int], session_id: str | None = None) -> str:
        """The agent to serve `prompt` (forked on disk when new); call `release` when done."""
        async with self._lock:
            family = await self._family(family_id)
            choice = self._choose(family_id, family, prompt, session_id)
            conversation = family.setdefault(choice.agent_id, Conversation(choice.agent_id))
            conversation.session_id, conversation.busy = session_id, True
            conversation.last_used = time.time()
            source = family[choice.prefix_from] if choice.prefix_from is not None else conversation
            logger.info(
                "family %s: agent %s serves a prompt of %d tokens (%d of them cached in %s)",
                family_id, choice.agent_id, len(prompt), source.shared(prompt), source.agent_id,
            )  # fmt: skip
            return choice.agent_id

    async def shared(self, family_id: str, prompt: list[int]) -> int:
        """The longest prefix of `prompt` that the family's own conversations hold."""
        async with self._lock:
            family = await self._family(family_id)
            return max((c.shared(prompt) for c in family.values()), default=0)

    def release(self, family_id: str, agent_id: str, tokens: list[int] | None, prompt_tokens: int) -> None:
        """The request on `agent_id` ended; `tokens` is what its cache now holds (None: unknown)."""
        conversation = self._families.get(family_id, {}).get(agent_id)
        if conversation is None:
            return
        conversation.busy = False
        conversation.tokens = list(tokens or [])
        conversation.prompt_tokens = prompt_tokens if tokens else 0

    def _choose(
        self, family_id: str, family: dict[str, Conversation], prompt: list[int], session_id: str | None
    ) -> Choice:
        if session_id is not None:
            agent_id = derived_agent_id(f"{family_id}.s", session_id)
            return Choice(agent_id) if agent_id in family else self._new(agent_id, family, prompt)
        free = [c for c in family.values() if not c.busy and c.session_id is None]
        continued = [c for c in free if c.continued_by(prompt)]
        if continued:
            return Choice(max(continued, key=lambda c: (c.shared(prompt), c.last_used)).agent_id)
        if not family:
            return Choice(family_id)
        if len(family) >= self.max_conversations and free:
            return Choice(max(free, key=lambda c: (c.shared(prompt), c.last_used)).agent_id)
        return self._new(f"{family_id}.c-{secrets.token_hex(6)}", family, prompt)

    @staticmethod
    def _new(agent_id: str, family: dict[str, Conversation], prompt: list[int]) -> Choice:
        base = max(family.values(), key=lambda c: c.shared(prompt), default=None)
        return Choice(agent_id, base.agent_id if base is not None and base.shared(prompt) > 0 else None)

    async def _family(self, family_id: str) -> dict[str, Conversation]:
        """The family's conversations; the first time, those its checkpoints on disk record."""
        family = self._families.get(family_id)
        if family is None:
            family = self._families[family_id] = {}
            for manifest in await asyncio.to_thread(self.manager.store.list_agents):
                metadata = manifest.get("metadata") or {}
                agent_id = manifest.get("agent_id")
                if agent_id and (metadata.get("family") == family_id or agent_id == family_id):
                    tokens = await self.manager.tokens(agent_id)
                    prompt_tokens = min(int(metadata.get("prompt_tokens") or len(tokens)), len(tokens))
                    family[agent_id] = Conversation(agent_id, tokens, prompt_tokens, metadata.get("session"))
        return family

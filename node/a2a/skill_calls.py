"""A skill asked directly, outside A2A's task machinery: the MCP tools and the dashboard's box.

`ask_skill` runs one turn through the skill executor's own `answer` (the same prompt, playbook,
conversation and agent as an A2A task), so a follow-up with the same context id continues the same
persistent conversation and reads its cache. `contexts` lists the agents the node keeps, with the
skill and context id their checkpoints record.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field

from node.a2a.conversation import Conversation, conversation_agent_id
from node.a2a.executor import SkillExecutor, SkillRuntime, TurnRequest, a2a_usage
from node.errors import NodeError

logger = logging.getLogger(__name__)
MAX_CONTEXT_ID_CHARS = 256


class SkillCallError(NodeError):
    """A direct skill call the node refuses (unknown skill, bad context id, empty question)."""


@dataclass(frozen=True)
class SkillAnswer:
    skill: str
    context_id: str
    text: str
    finish_reason: str
    usage: dict  # camelCase, as A2A task metadata carries it
    reports: tuple[str, ...] = ()  # further artifacts as text (the coordinator's delegation report)


@dataclass
class CollectedOutput:
    """What `SkillExecutor.answer` writes (the interface of `TaskOutput`), kept in memory."""

    text: list[str] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)

    async def write(self, text: str) -> None:
        self.text.append(text)

    async def close(self) -> None:
        pass

    async def add_artifact(self, parts, name: str) -> None:
        self.reports += [part.text for part in parts if part.text]


async def ask_skill(
    runtime: SkillRuntime, executor: SkillExecutor, question: str, context_id: str | None = None
) -> SkillAnswer:
    """One turn of `context_id`'s conversation with the skill (a new conversation when None),
    counted against the node's admission limit like every request."""
    if not question.strip():
        raise SkillCallError("the question is empty")
    context_id = context_id or str(uuid.uuid4())
    if len(context_id) > MAX_CONTEXT_ID_CHARS:
        raise SkillCallError(f"context id longer than {MAX_CONTEXT_ID_CHARS} characters")
    task_id = f"direct-{uuid.uuid4()}"
    runtime.gate.enter()  # the node's admission limit, shared with every API (raises Overloaded)
    out, stop = CollectedOutput(), runtime.running.setdefault(task_id, threading.Event())
    try:
        completion = await executor.answer(TurnRequest(task_id, context_id, question, {}), out, stop)
    finally:
        runtime.running.pop(task_id, None)
        runtime.gate.leave()
    return SkillAnswer(
        executor.skill_id,
        context_id,
        "".join(out.text),
        completion.finish_reason,
        a2a_usage(completion.usage),
        tuple(out.reports),
    )


def find_executor(executors: dict[str, SkillExecutor], skill: str) -> SkillExecutor:
    try:
        return executors[skill]
    except KeyError:
        raise SkillCallError(f"unknown skill {skill!r}; this node hosts {', '.join(executors)}") from None


async def conversation(runtime: SkillRuntime, skill: str, context_id: str) -> dict:
    """One skill context: its agent, tokens cached and finished turns."""
    manager = runtime.require_manager()
    agent_id = conversation_agent_id(skill, context_id)
    metadata = await manager.metadata(agent_id)
    if metadata is None:
        raise SkillCallError(f"no context {context_id!r} for skill {skill!r}")
    return {
        "skill": skill,
        "context_id": context_id,
        "agent_id": agent_id,
        "tokens": len(await manager.tokens(agent_id)),
        "messages": list(Conversation.from_metadata(metadata).messages),
    }


def contexts(manager, skills: tuple[str, ...] = ()) -> list[dict]:
    """Every agent in memory or on disk: tokens, bytes, last use, restores, and for a skill's
    conversation its skill and context id; a skill's base agent (named by the skill id among
    `skills`) says so (blocking: reads the checkpoint folder)."""
    stats = manager.stats()
    rows: dict[str, dict] = {}
    for saved in _on_disk(manager):
        agent_id = saved.get("agent_id")
        if not agent_id:
            continue
        metadata = saved.get("metadata") or {}
        rows[agent_id] = _row(agent_id, metadata, saved.get("token_count", 0), saved.get("updated"))
        rows[agent_id]["bytes_on_disk"] = saved.get("bytes_on_disk", 0)
    for agent_id, live in (stats.get("agents") or {}).items():
        row = rows.setdefault(agent_id, _row(agent_id, {}, live.get("tokens", 0), None))
        row.update(
            in_memory=True,
            tokens=live.get("tokens", row["tokens"]),
            bytes_in_memory=live.get("bytes_in_memory", 0),
            last_used=live.get("last_used", row["last_used"]),
            tasks=live.get("tasks", 0),
            restores=live.get("restores", 0),
            prefill_tokens_avoided=live.get("prefill_tokens_avoided", 0),
            seconds_saved=round(live.get("seconds_saved", 0.0), 3),
        )
    for agent_id in set(rows) & set(skills):
        rows[agent_id].update(skill=agent_id, context_id="(base)")
    return sorted(rows.values(), key=lambda row: row["last_used"] or 0, reverse=True)


def _row(agent_id: str, metadata: dict, tokens: int, last_used: float | None) -> dict:
    return {
        "agent_id": agent_id,
        "skill": metadata.get("skill"),
        "context_id": metadata.get("context_id"),
        "api": metadata.get("api"),
        "turns": len(metadata.get("messages") or []) // 2,
        "tokens": tokens,
        "in_memory": False,
        "bytes_in_memory": 0,
        "bytes_on_disk": 0,
        "last_used": last_used,
        "tasks": 0,
        "restores": 0,
        "prefill_tokens_avoided": 0,
        "seconds_saved": 0.0,
    }


def _on_disk(manager) -> list[dict]:
    try:
        return manager.store.list_agents()
    except (AttributeError, OSError) as e:  # the memory layer is being reworked (block store)
        logger.warning("checkpoint listing unavailable: %s", e)
        return []

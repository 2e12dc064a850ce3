"""Delegation to peers over A2A: find the nodes that host a skill, send one sub-task, retry.

A peer is any A2A agent whose card lists the skill; a node of this project routes a message to the
skill named in its metadata. This node itself is a peer like any other (same HTTP code path), tried
after the others. A sub-task is streamed with the a2a-sdk client; an attempt that cannot connect,
breaks off, runs past `timeout_s` or ends FAILED/REJECTED/CANCELED moves on to the next peer with
the skill. A slow attempt's remote task is cancelled before moving on, so it stops generating.
A sub-task gets at most `MAX_ATTEMPTS` peers and `deadline_s` seconds over all of them.

Every call goes through the node's outbound client (`node.network.outbound`: per-origin keys,
no private or metadata addresses, capped bodies). A peer's card is read by this module and its
interfaces must be at the peer's own origin: a card cannot send the node's messages elsewhere.
A peer's usage figures are taken only as non-negative integers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field

import httpx
from a2a.client import Client, ClientConfig, create_client
from a2a.client.card_resolver import parse_agent_card
from a2a.types import CancelTaskRequest, Message, Part, Role, SendMessageRequest, TaskState
from a2a.utils.constants import AGENT_CARD_WELL_KNOWN_PATH
from google.protobuf.json_format import MessageToDict

from node.config import NodeConfig
from node.errors import PeerFailure
from node.network.outbound import origin
from node.network.registry import REGISTRY_PATH

logger = logging.getLogger(__name__)
CARD_TTL_S = 30.0
LOOKUP_TIMEOUT_S = 5.0
CANCEL_TIMEOUT_S = 3.0
MAX_DETAIL_CHARS = 300
MAX_ATTEMPTS = 3
REPORT_ARTIFACT = "delegation"
FAILED_STATES = {
    TaskState.TASK_STATE_FAILED: "failed",
    TaskState.TASK_STATE_REJECTED: "rejected",
    TaskState.TASK_STATE_CANCELED: "canceled",
}


@dataclass(frozen=True)
class Attempt:
    peer: str
    outcome: str  # completed, unreachable, timeout, failed, rejected, canceled, error
    elapsed_s: float
    detail: str = ""

    def as_dict(self) -> dict:
        """As the delegation artifact carries it (camelCase, like all A2A JSON)."""
        return {
            "peer": self.peer,
            "outcome": self.outcome,
            "elapsedSeconds": round(self.elapsed_s, 3),
            "detail": self.detail,
        }


@dataclass(frozen=True)
class Answer:
    """A peer's finished sub-task: the answer text, its task id and the usage it reported."""

    text: str
    task_id: str
    usage: dict


@dataclass(frozen=True)
class SubtaskResult:
    """What became of one sub-task: the answer and who gave it, or why it is missing."""

    skill: str
    question: str
    answer: Answer | None
    attempts: tuple[Attempt, ...] = field(default=())

    @property
    def peer(self) -> str | None:
        return self.attempts[-1].peer if self.answer is not None else None

    @property
    def elapsed_s(self) -> float:
        return sum(a.elapsed_s for a in self.attempts)

    def as_dict(self) -> dict:
        return {
            "skill": self.skill,
            "question": self.question,
            "answered": self.answer is not None,
            "peer": self.peer,
            "taskId": self.answer.task_id if self.answer else None,
            "elapsedSeconds": round(self.elapsed_s, 3),
            "usage": self.answer.usage if self.answer else None,
            "attempts": [a.as_dict() for a in self.attempts],
        }


class PeerDirectory:
    """Nodes by skill: registry members, then `--peer` nodes whose card lists it, then this node."""

    def __init__(self, config: NodeConfig, http: httpx.AsyncClient) -> None:
        self.config = config
        self.http = http
        self._cards: dict[str, tuple[float, tuple[str, ...]]] = {}

    async def candidates(self, skill: str, context_id: str | None = None) -> list[str]:
        """Nodes for `skill`; with `context_id`, the node holding that conversation hot first."""
        found = await self._from_registry(skill)
        for peer in self.config.peers:
            if skill in await self._card_skills(peer):
                found.append(peer)
        me = self.config.base_url
        found = [url for url in dict.fromkeys(u.rstrip("/") for u in found) if url != me]
        found += [me] if skill in self.config.skills else []
        holder = await self._holder(skill, context_id) if context_id else None
        return sorted(found, key=lambda url: url != holder)

    async def _holder(self, skill: str, context_id: str) -> str | None:
        """The live node holding this conversation of `skill` in memory (the registry knows)."""
        from node.a2a.conversation import conversation_agent_id
        from node.network.context_holders import ask_registry

        if self.config.registry_url is None:
            return None
        try:
            found = await ask_registry(
                self.http, self.config.registry_url, conversation_agent_id(skill, context_id), skill
            )
        except (httpx.HTTPError, ValueError) as e:
            logger.info("registry %s: no holder for a context of %s: %s", self.config.registry_url, skill, e)
            return None
        return found.get("holder") if found.get("alive") else None

    async def _from_registry(self, skill: str) -> list[str]:
        if self.config.registry_url is None:
            return []
        try:
            response = await self.http.get(
                self.config.registry_url + REGISTRY_PATH, params={"skill": skill}, timeout=LOOKUP_TIMEOUT_S
            )
            response.raise_for_status()
            return [member["url"] for member in response.json()["members"]]
        except (httpx.HTTPError, ValueError, KeyError) as e:
            logger.warning("registry %s: no members for %s: %s", self.config.registry_url, skill, e)
            return []

    async def _card_skills(self, url: str) -> tuple[str, ...]:
        cached = self._cards.get(url)
        if cached is not None and time.monotonic() - cached[0] < CARD_TTL_S:
            return cached[1]
        try:
            response = await self.http.get(url + AGENT_CARD_WELL_KNOWN_PATH, timeout=LOOKUP_TIMEOUT_S)
            response.raise_for_status()
            skills = tuple(s["id"] for s in response.json().get("skills", []))
        except (httpx.HTTPError, ValueError, KeyError) as e:
            logger.warning("peer %s: no card: %s", url, e)
            return ()
        self._cards[url] = (time.monotonic(), skills)
        return skills


class PeerClient:
    """Streams sub-tasks to peers with the a2a-sdk client (one client per peer URL, reused)."""

    def __init__(self, http: httpx.AsyncClient, timeout_s: float) -> None:
        self.http = http
        self.timeout_s = timeout_s
        self._clients: dict[str, Client] = {}

    async def ask(self, url: str, skill: str, text: str, context_id: str, metadata: dict) -> Answer:
        """Send `text` to the skill at `url` -> its answer; raises PeerFailure."""
        collected = _Collected()
        try:
            async with asyncio.timeout(self.timeout_s):
                client = await self._client(url)
                request = text_request(text, context_id, {**metadata, "skill": skill})
                async for event in client.send_message(request):
                    collected.add(event)
        except TimeoutError:
            await self._cancel_remote(url, collected.task_id)
            raise PeerFailure("timeout", f"no answer within {self.timeout_s:g} s") from None
        except asyncio.CancelledError:
            await asyncio.shield(self._cancel_remote(url, collected.task_id))
            raise
        except PeerFailure:
            raise
        except Exception as e:
            self._clients.pop(url, None)
            raise PeerFailure(_outcome(e), _describe(e)) from e
        return collected.answer()

    async def _client(self, url: str) -> Client:
        if url not in self._clients:
            config = ClientConfig(httpx_client=self.http, streaming=True)
            self._clients[url] = await create_client(await self.card(url), config)
        return self._clients[url]

    async def card(self, url: str):
        """The peer's card, refused (PeerFailure "refused") when an interface is at another origin."""
        response = await self.http.get(url + AGENT_CARD_WELL_KNOWN_PATH, timeout=LOOKUP_TIMEOUT_S)
        response.raise_for_status()
        card = parse_agent_card(response.json())
        elsewhere = [i.url for i in card.supported_interfaces if origin(i.url) != origin(url)]
        if elsewhere:
            raise PeerFailure("refused", f"its card points at {', '.join(elsewhere)}, not at {origin(url)}")
        return card

    async def _cancel_remote(self, url: str, task_id: str | None) -> None:
        client = self._clients.get(url)
        if client is None or task_id is None:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CANCEL_TIMEOUT_S):
                await client.cancel_task(CancelTaskRequest(id=task_id))


class Delegator:
    """Runs one sub-task: the peers hosting its skill in turn, until one answers."""

    def __init__(
        self,
        directory: PeerDirectory,
        client: PeerClient,
        deadline_s: float = 300.0,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        self.directory = directory
        self.client = client
        self.deadline_s = deadline_s
        self.max_attempts = max_attempts

    async def run(self, skill: str, question: str, context_id: str, metadata: dict) -> SubtaskResult:
        attempts: list[Attempt] = []
        deadline = time.monotonic() + self.deadline_s
        for url in (await self.directory.candidates(skill, context_id))[: self.max_attempts]:
            started, left = time.monotonic(), deadline - time.monotonic()
            if left <= 0:
                attempts.append(
                    Attempt(url, "timeout", 0.0, f"the sub-task's {self.deadline_s:g} s are spent")
                )
                break
            try:
                async with asyncio.timeout(left):
                    answer = await self.client.ask(url, skill, question, context_id, metadata)
            except (PeerFailure, TimeoutError) as e:
                failure = (
                    e
                    if isinstance(e, PeerFailure)
                    else PeerFailure("timeout", "the sub-task's deadline passed")
                )
                logger.warning("%s at %s: %s", skill, url, failure)
                attempts.append(Attempt(url, failure.outcome, time.monotonic() - started, failure.detail))
                continue
            attempts.append(Attempt(url, "completed", time.monotonic() - started))
            return SubtaskResult(skill, question, answer, tuple(attempts))
        return SubtaskResult(skill, question, None, tuple(attempts))


class _Collected:
    """The events of one streamed sub-task, reduced to its answer."""

    def __init__(self) -> None:
        self.task_id: str | None = None
        self.state = TaskState.TASK_STATE_UNSPECIFIED
        self.chunks: list[str] = []
        self.metadata: dict = {}
        self.reason = ""

    def add(self, event) -> None:
        if event.HasField("task"):
            self.task_id = event.task.id
            self.state = event.task.status.state
        elif event.HasField("status_update"):
            self.task_id = event.status_update.task_id
            self.state = event.status_update.status.state
            self.metadata |= MessageToDict(event.status_update.metadata)
            self.reason = _text(event.status_update.status.message.parts) or self.reason
        elif event.HasField("artifact_update") and event.artifact_update.artifact.name != REPORT_ARTIFACT:
            self.chunks.append(_text(event.artifact_update.artifact.parts))
        elif event.HasField("message"):  # an agent may answer with a message instead of a task
            self.chunks.append(_text(event.message.parts))
            self.state = TaskState.TASK_STATE_COMPLETED

    def answer(self) -> Answer:
        if self.state in FAILED_STATES:
            raise PeerFailure(FAILED_STATES[self.state], self.reason or "the peer gave no reason")
        if self.state != TaskState.TASK_STATE_COMPLETED:
            raise PeerFailure("error", f"stream ended in state {TaskState.Name(self.state)}")
        return Answer("".join(self.chunks), self.task_id or "", clean_usage(self.metadata.get("usage")))


def clean_usage(usage) -> dict:
    """A peer's usage with only its non-negative integer figures (a malformed one is no figures)."""
    if not isinstance(usage, dict):
        return {}
    return {
        k: v
        for k, v in usage.items()
        if isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 2**53
    }


def text_request(text: str, context_id: str, metadata: dict) -> SendMessageRequest:
    """A SendMessageRequest with one text part in `context_id`."""
    message = Message(
        message_id=str(uuid.uuid4()),
        role=Role.ROLE_USER,
        parts=[Part(text=text)],
        context_id=context_id,
        metadata=metadata,
    )
    return SendMessageRequest(message=message)


def _text(parts) -> str:
    return "".join(p.text for p in parts if p.WhichOneof("content") == "text")


def _causes(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _outcome(error: Exception) -> str:
    if any(isinstance(e, (httpx.ConnectError, ConnectionRefusedError)) for e in _causes(error)):
        return "unreachable"
    return "error"


def _describe(error: Exception) -> str:
    text = "; ".join(dict.fromkeys(f"{type(e).__name__}: {e}".strip(": ") for e in _causes(error)))
    return text[:MAX_DETAIL_CHARS]

"""`python -m node --demo`: a two-node A2A network on loopback, two sessions, a coordinated task.

    node A: technical + business analysis, and the registry (members in SQLite)
    node B: coordination, joins A's registry and delegates to the experts it finds there

Session 1 creates three persistent agents (one conversation per skill) over a shared brief; both
nodes are restarted; session 2 resumes each conversation from its checkpoint and compares the
restore with a cold prefill of the same brief, then B coordinates a task across the nodes. The
report ends with where the caches live and how large they are. Every node is a real
`python -m node serve` process, stopped (process group) in a `finally`.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
from a2a.client import ClientConfig, create_client
from a2a.types import TaskState
from google.protobuf.json_format import MessageToDict

from node.a2a.conversation import conversation_agent_id
from node.config import available_cores
from node.demo import report
from node.demo.nodes import DemoNode, free_port, start_all, stop_all
from node.network.peers import text_request
from skills.coordination import subtask_context

MAX_TOKENS = 80
DELEGATED_MAX_TOKENS = 80
HEARTBEAT_S = 2.0
CLIENT_TIMEOUT_S = 600
BRIEF = (
    "Project brief. Our online shop serves 40,000 daily users from one PostgreSQL database. Product "
    "pages read the catalogue (120,000 products, prices updated hourly by a batch job) and the stock "
    "levels (updated on every order). At peak hours the database CPU reaches 85 percent and the p99 "
    "page latency is 900 ms; the target is 300 ms. The team proposes a read-through cache (Redis) for "
    "catalogue pages with a 10 minute expiry, invalidated by the hourly price job, while stock levels "
    "keep going to the database. A managed Redis instance costs about 400 euros a month; the team has "
    "two backend engineers and estimates three weeks of work including load tests. Risks discussed so "
    "far: stale prices after a failed invalidation, a thundering herd when hot keys expire together, "
    "and the cache becoming a second source of truth. Finance asks for the expected effect on "
    "conversion: a previous A/B test showed one percent more orders per 100 ms of latency saved. The "
    "shop's monthly revenue is 2.1 million euros with a gross margin of 30 percent. Operations wants "
    "dashboards for hit rate, memory, evictions and latency before launch, and a switch to turn the "
    "cache off without a deploy."
)
QUESTIONS = {
    "technical_analysis": ("Read the brief. What is the main technical risk?", "How would you test it?"),
    "business_analysis": ("Read the brief. Is the project worth its cost?", "What should finance measure?"),
    "coordination": ("Read the brief. What are the first three steps?", "Who should own each step?"),
}
COORDINATED_TASK = "Decide whether to launch the catalogue cache next month, and what must be true first."


@dataclass(frozen=True)
class Turn:
    agent: str
    node: str
    text: str
    usage: dict
    wall_s: float
    delegation: dict | None = None


def run(cache_dir: str | None = None) -> int:
    for noisy in ("httpx", "a2a"):  # one line per request would bury the report
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root = (
        Path(cache_dir).expanduser().resolve() if cache_dir else Path(tempfile.mkdtemp(prefix="node-demo-"))
    )
    root.mkdir(parents=True, exist_ok=True)
    return asyncio.run(Demo(root).run())


class Demo:
    def __init__(self, root: Path) -> None:
        self.root = root
        a_port = free_port()
        # The two nodes share the machine by the agents they host (A two, B one), so their compute
        # threads do not oversubscribe it (measured: 1.3-1.6 tok/s per agent oversubscribed).
        cores = available_cores()
        threads_b = max(1, cores // 3)
        threads_a = max(1, cores - threads_b)
        self.a = DemoNode(
            "A", a_port, root / "node-a", root, "--skills", "technical_analysis,business_analysis",
            "--registry", "--heartbeat", str(HEARTBEAT_S), "--max-tokens", str(MAX_TOKENS), "--threads", str(threads_a),
        )  # fmt: skip
        self.b = DemoNode(
            "B", free_port(), root / "node-b", root, "--skills", "coordination",
            "--join", self.a.url, "--heartbeat", str(HEARTBEAT_S), "--max-tokens", str(MAX_TOKENS),
            "--threads", str(threads_b),
        )  # fmt: skip
        self.nodes = [self.a, self.b]
        self.contexts = {skill: f"demo-{skill}-{uuid.uuid4().hex[:8]}" for skill in QUESTIONS}
        self.labels = _labels(self.contexts)

    def node_of(self, skill: str) -> DemoNode:
        return self.b if skill == "coordination" else self.a

    async def run(self) -> int:
        started = time.monotonic()
        report.title(self.root, self.nodes)
        try:
            first = await self.session_one()
            await self.restart()
            resumed, cold = await self.session_two()
            report.resume_table(first, resumed, cold)
            await self.coordinate()
            await report.caches(self.nodes, self.labels)
        finally:
            stop_all(self.nodes)
        report.footer(time.monotonic() - started, self.root)
        return 0

    async def session_one(self) -> dict[str, Turn]:
        report.section("Session 1: start the network, create three agents")
        report.startup(await asyncio.to_thread(start_all, self.nodes))
        report.base_contexts(await self.health())
        await self.wait_registered()
        turns = await asyncio.gather(*(self.first_turn(skill) for skill in QUESTIONS))
        report.turns(turns)
        return {t.agent: t for t in turns}

    async def restart(self) -> None:
        report.section("Restart: stop both nodes (agents checkpointed), start them again")
        await asyncio.to_thread(stop_all, self.nodes)
        report.startup(await asyncio.to_thread(start_all, self.nodes))
        report.base_contexts(await self.health())
        await self.wait_registered()

    async def session_two(self) -> tuple[dict[str, Turn], dict[str, Turn]]:
        report.section("Session 2: resume each agent from its checkpoint")
        resumed = await asyncio.gather(*(self.follow_up(skill) for skill in QUESTIONS))
        report.turns(resumed)
        cold = {}
        for skill in QUESTIONS:  # one at a time, so the cold prefills do not share the CPU
            context_id = f"demo-cold-{skill}-{uuid.uuid4().hex[:8]}"
            self.labels[conversation_agent_id(skill, context_id)] = "cold-prefill control (1 token)"
            # Marked, so that no stored conversation shares the brief: stored prefixes are reused
            # across contexts, and the control must prefill the brief itself.
            control = f"(control run {context_id[-8:]}) {_first_prompt(skill)}"
            cold[skill] = await self.ask(skill, control, context_id, max_tokens=1, delegate=False)
        return {t.agent: t for t in resumed}, cold

    async def coordinate(self) -> None:
        report.section("Coordinated task: node B plans, delegates to node A over A2A, synthesizes")
        turn = await self.ask(
            "coordination", COORDINATED_TASK, self.contexts["coordination"], max_tokens=DELEGATED_MAX_TOKENS
        )
        report.delegation(turn, {node.url: f"node {node.name}" for node in self.nodes})

    async def first_turn(self, skill: str) -> Turn:
        return await self.ask(skill, _first_prompt(skill), self.contexts[skill], delegate=False)

    async def follow_up(self, skill: str) -> Turn:
        return await self.ask(skill, QUESTIONS[skill][1], self.contexts[skill], delegate=False)

    async def ask(self, skill: str, text: str, context_id: str, **metadata) -> Turn:
        node = self.node_of(skill)
        started = time.monotonic()
        async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as http:
            client = await create_client(node.url, ClientConfig(httpx_client=http, streaming=True))
            request = text_request(text, context_id, {"skill": skill, **metadata})
            events = [event async for event in client.send_message(request)]
        return _turn(skill, node.name, events, time.monotonic() - started)

    async def health(self) -> dict[str, dict]:
        async with httpx.AsyncClient(timeout=10) as http:
            return {node.name: (await http.get(f"{node.url}/health")).json() for node in self.nodes}

    async def wait_registered(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=10) as http:
            while time.monotonic() < deadline:
                found = (await http.get(f"{self.a.url}/registry/nodes")).json()["members"]
                if {m["url"] for m in found} >= {n.url for n in self.nodes}:
                    report.members(found, {n.url: f"node {n.name}" for n in self.nodes})
                    return
                await asyncio.sleep(0.3)
        raise RuntimeError("the nodes did not register with the registry in time")


def _labels(contexts: dict[str, str]) -> dict[str, str]:
    """What each agent the demo creates is, by agent id (for the cache listing)."""
    labels = {skill: "skill base: playbook or system prompt" for skill in contexts}
    for skill, context_id in contexts.items():
        labels[conversation_agent_id(skill, context_id)] = "conversation, sessions 1+2"
        if skill != "coordination":
            sub = subtask_context(contexts["coordination"], skill)
            labels[conversation_agent_id(skill, sub)] = "sub-task delegated by node B"
    return labels


def _first_prompt(skill: str) -> str:
    return f"{BRIEF}\n\n{QUESTIONS[skill][0]}"


def _turn(skill: str, node: str, events: list, wall_s: float) -> Turn:
    answer, usage, delegation, state = [], {}, None, None
    for event in events:
        if event.HasField("artifact_update"):
            artifact = event.artifact_update.artifact
            if artifact.name == "delegation":
                delegation = MessageToDict(artifact.parts[1].data)
            else:
                answer += [p.text for p in artifact.parts]
        elif event.HasField("status_update"):
            state = event.status_update.status.state
            usage = MessageToDict(event.status_update.metadata).get("usage", usage)
    if state != TaskState.TASK_STATE_COMPLETED:
        raise RuntimeError(f"{skill} on node {node} ended in state {TaskState.Name(state or 0)}")
    return Turn(skill, node, "".join(answer), usage, wall_s, delegation)

"""The A2A node as a real `python -m node serve` process, driven by the a2a-sdk client.

Generation is kept to a few tokens (the 270M base model's answers are poor; that is not the point).
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid

import httpx
import pytest
from a2a.client import ClientConfig, create_client
from a2a.types import (
    CancelTaskRequest,
    GetTaskRequest,
    ListTaskPushNotificationConfigsRequest,
    ListTasksRequest,
    SubscribeToTaskRequest,
    TaskPushNotificationConfig,
    TaskState,
)

from tests.a2a_node import (
    NodeProcess,
    a2a_client,
    final_task,
    http_client,
    metadata_of,
    poll_until,
    send,
    usage,
    user_message,
)
from tests.conftest import free_port

pytestmark = pytest.mark.slow
SKILLS = ("technical_analysis", "business_analysis", "coordination")
MAX_TOKENS = 24  # what the tests ask for
# The node's --max-tokens: what a request without max_tokens gets (the cancel test's stream, which
# must still be running when its cancel arrives).
CAP = 96
MAX_MESSAGE_BYTES = 20_000


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    folder = tmp_path_factory.mktemp("a2a-node")
    process = NodeProcess(
        free_port(),
        folder / "cache",
        "--max-tokens",
        str(CAP),
        "--max-message-bytes",
        str(MAX_MESSAGE_BYTES),
        # A chunk per token: what the streaming and cancel tests see then does not depend on how
        # many tokens the machine decodes in the default 100 ms (tests/a2a/test_task_output.py
        # checks the gathering itself).
        "--stream-chunk",
        "0",
    ).start()
    yield process
    assert process.stop() == 0, process.log()[-3000:]


def rpc(method: str, params: dict | None = None, **extra) -> dict:
    return {"jsonrpc": "2.0", "id": str(uuid.uuid4()), "method": method, "params": params or {}, **extra}


def rpc_message(text: str | None = "hello", **metadata) -> dict:
    parts = [] if text is None else [{"text": text}]
    message = {"messageId": str(uuid.uuid4()), "role": "ROLE_USER", "parts": parts, "metadata": metadata}
    return {"message": message}


def agent_id(skill: str, context_id: str) -> str:
    return f"{skill}.ctx-{hashlib.sha256(context_id.encode()).hexdigest()[:24]}"


# ---- cards ---------------------------------------------------------------------------------
async def test_node_card_at_both_paths_and_each_skill_has_its_own(node):
    async with http_client() as http:
        current = (await http.get(f"{node.url}/.well-known/agent-card.json")).json()
        legacy = (await http.get(f"{node.url}/.well-known/agent.json")).json()
        # The legacy path adds the v0.3 interfaces and fields (see tests/a2a/test_app.py).
        assert legacy["url"] == node.url and legacy["skills"] == current["skills"]
        assert [s["id"] for s in current["skills"]] == list(SKILLS)
        assert current["capabilities"]["streaming"] is True
        assert "persistent-context" in current["capabilities"]["extensions"][0]["uri"]
        assert {i["url"] for i in current["supportedInterfaces"]} == {node.url}
        for skill in SKILLS:
            card = (await http.get(f"{node.url}/skills/{skill}/.well-known/agent-card.json")).json()
            assert [s["id"] for s in card["skills"]] == [skill]
            assert card["supportedInterfaces"][0]["url"] == f"{node.url}/skills/{skill}"
            assert "securitySchemes" not in card


# ---- answers -------------------------------------------------------------------------------
async def test_each_skill_answers_on_the_main_endpoint(node):
    async with http_client() as http:
        client = await a2a_client(http, node.url)
        for skill in (*SKILLS, None):
            metadata = {"max_tokens": 3} | ({"skill": skill} if skill else {})
            task = final_task(await send(client, "Name one benefit of caching.", **metadata))
            assert task.status.state == TaskState.TASK_STATE_COMPLETED, task
            assert metadata_of(task)["skill"] == (skill or "coordination")
            assert "".join(p.text for a in task.artifacts for p in a.parts).strip()
            numbers = usage(task)
            assert numbers["generatedTokens"] == 3
            assert numbers["promptTokens"] == numbers["cachedTokens"] + numbers["prefilledTokens"]
            # A new context starts from the skill's prefilled system prompt.
            assert numbers["cachedTokens"] >= 30


NEW_QUESTIONS = {  # in neither the playbooks nor the eval set
    "technical_analysis": "Our nightly report job takes six hours on one server. How can we make it faster?",
    "business_analysis": "Should a five-person startup hire a full-time designer or use freelancers?",
}


@pytest.mark.parametrize("skill", NEW_QUESTIONS)
async def test_answers_do_not_echo_the_instructions(node, skill):
    """The base model reads the skill's playbook as a document: it answers, it does not repeat it."""
    from node.a2a.playbooks import playbook
    from node.eval.scoring import echoed_run
    from skills import SKILLS as EXECUTORS

    async with http_client() as http:
        client = await a2a_client(http, node.url)
        task = final_task(await send(client, NEW_QUESTIONS[skill], skill=skill, max_tokens=MAX_TOKENS))
    answer = "".join(p.text for a in task.artifacts for p in a.parts)
    instructions = [EXECUTORS[skill].system_prompt, playbook(skill), NEW_QUESTIONS[skill]]
    assert len(answer.split()) >= 3, answer
    assert echoed_run(answer, instructions) is None, answer
    assert not answer.strip().startswith(EXECUTORS[skill].system_prompt[:30]), answer


async def test_skill_agents_answer_concurrently_on_their_own_endpoints(node):
    async with http_client() as http:
        clients = [await a2a_client(http, f"{node.url}/skills/{skill}") for skill in SKILLS[:2]]
        results = await asyncio.gather(*(send(c, "Say something short.", max_tokens=3) for c in clients))
    tasks = [final_task(r) for r in results]
    assert [t.status.state for t in tasks] == [TaskState.TASK_STATE_COMPLETED] * 2
    assert [metadata_of(t)["skill"] for t in tasks] == list(SKILLS[:2])


async def test_streaming_yields_incremental_artifact_chunks(node):
    async with http_client() as http:
        client = await a2a_client(http, node.url, streaming=True)
        events = await send(
            client, "Explain prefix caching.", skill="technical_analysis", max_tokens=MAX_TOKENS
        )
    chunks = [e.artifact_update for e in events if e.HasField("artifact_update")]
    states = [e.status_update.status.state for e in events if e.HasField("status_update")]
    assert events[0].HasField("task")
    assert states[0] == TaskState.TASK_STATE_WORKING and states[-1] == TaskState.TASK_STATE_COMPLETED
    assert len(chunks) >= 3
    assert not chunks[0].append and all(c.append for c in chunks[1:])
    assert chunks[-1].last_chunk and not any(c.last_chunk for c in chunks[:-1])
    assert len({c.artifact.artifact_id for c in chunks}) == 1
    final = [e.status_update for e in events if e.HasField("status_update")][-1]
    generated = metadata_of(final)["usage"]["generatedTokens"]
    assert generated >= 12, generated  # the answer did not stop before the chunks it is about


async def test_rest_transport_send_get_and_list(node):
    config = ClientConfig(httpx_client=None, streaming=False, supported_protocol_bindings=["HTTP+JSON"])
    async with http_client() as http:
        config.httpx_client = http
        client = await create_client(node.url, config)
        task = final_task(await send(client, "Hello over REST.", skill="business_analysis", max_tokens=2))
        assert task.status.state == TaskState.TASK_STATE_COMPLETED
        fetched = await client.get_task(GetTaskRequest(id=task.id))
        assert fetched.id == task.id and fetched.status.state == TaskState.TASK_STATE_COMPLETED
        listed = await client.list_tasks(ListTasksRequest())
        assert task.id in {t.id for t in listed.tasks}


async def test_subscribe_to_a_running_task_and_push_configs(node):
    async with http_client() as http:
        polling = await create_client(
            node.url, ClientConfig(httpx_client=http, streaming=False, polling=True)
        )
        streaming = await a2a_client(http, node.url, streaming=True)
        # The node's cap: the task must outlast the two calls before the subscription on a fast machine.
        task = final_task(await send(polling, "Describe a cache in a few words.", max_tokens=CAP))
        assert task.status.state in (TaskState.TASK_STATE_SUBMITTED, TaskState.TASK_STATE_WORKING)
        config = TaskPushNotificationConfig(task_id=task.id, id="hook-1", url="http://127.0.0.1:9/hook")
        await polling.create_task_push_notification_config(config)
        configs = await polling.list_task_push_notification_configs(
            ListTaskPushNotificationConfigsRequest(task_id=task.id)
        )
        assert [c.id for c in configs.configs] == ["hook-1"]
        events = [e async for e in streaming.subscribe(SubscribeToTaskRequest(id=task.id))]
    states = [e.status_update.status.state for e in events if e.HasField("status_update")]
    assert states[-1] == TaskState.TASK_STATE_COMPLETED
    assert any(e.HasField("artifact_update") for e in events)


# ---- persistent contexts -------------------------------------------------------------------
async def test_same_context_reuses_the_cache_also_after_a_restart(node):
    context_id = f"ctx-{uuid.uuid4()}"
    async with http_client() as http:
        client = await a2a_client(http, node.url)
        first = usage(
            final_task(
                await send(
                    client, "What is a KV cache?", context_id, skill="technical_analysis", max_tokens=4
                )
            )
        )
        second = usage(
            final_task(
                await send(client, "Why keep it?", context_id, skill="technical_analysis", max_tokens=4)
            )
        )
    # Turn two's cached prefix covers turn one's whole prompt and (all but the last token of) its answer.
    assert second["cachedTokens"] >= first["promptTokens"] + first["generatedTokens"] - 1
    assert second["prefilledTokens"] < second["promptTokens"] - first["promptTokens"]

    node.restart()
    async with http_client() as http:
        client = await a2a_client(http, node.url)
        third = usage(
            final_task(
                await send(client, "And on disk?", context_id, skill="technical_analysis", max_tokens=4)
            )
        )
        stats = (await http.get(f"{node.url}/agents")).json()
    assert third["cachedTokens"] >= second["promptTokens"] + second["generatedTokens"] - 1
    assert stats["agents"][agent_id("technical_analysis", context_id)]["restores"] == 1


async def test_two_turns_sent_at_once_in_one_context_both_land_in_its_history(node):
    from node.memory.checkpoint import CheckpointStore

    context_id = f"ctx-{uuid.uuid4()}"
    skill = "business_analysis"
    async with http_client() as http:
        client = await a2a_client(http, node.url)
        await send(client, "What is churn?", context_id, skill=skill, max_tokens=4)
        questions = ("Why does it matter?", "How is it measured?")
        await asyncio.gather(*(send(client, q, context_id, skill=skill, max_tokens=4) for q in questions))
    manifest = CheckpointStore(node.cache_dir, None).manifest(agent_id(skill, context_id))
    asked = [m["content"] for m in manifest["metadata"]["messages"] if m["role"] == "user"]
    assert asked[0] == "What is churn?" and sorted(asked[1:]) == sorted(questions)


# ---- cancel --------------------------------------------------------------------------------
async def test_cancel_stops_generation_mid_stream(node):
    text, skill = "Write a long essay about caches.", "business_analysis"
    context_id = f"ctx-{uuid.uuid4()}"
    async with http_client() as http:
        client = await a2a_client(http, node.url)
        reference = usage(final_task(await send(client, text, skill=skill, max_tokens=1)))
        streaming = await a2a_client(http, node.url, streaming=True)
        task_id = None
        async for event in streaming.send_message(user_message(text, context_id, skill=skill)):
            if event.HasField("task"):
                task_id = event.task.id
            if event.HasField("artifact_update"):
                cancelled = await client.cancel_task(CancelTaskRequest(id=task_id))
                break
        assert cancelled.status.state == TaskState.TASK_STATE_CANCELED

        async def stopped_and_checkpointed() -> dict | None:
            """The agent once the worker noticed the cancel at its next token, ended the task and
            checkpointed what it had (None before)."""
            health = (await http.get(f"{node.url}/health")).json()
            agent = (await http.get(f"{node.url}/agents")).json()["agents"].get(agent_id(skill, context_id))
            if health["running_tasks"] == 0 and agent and agent["tasks"] == 1:
                return agent if agent["persisted_tokens"] == agent["tokens"] else None
            return None

        agent = await poll_until(stopped_and_checkpointed)
        after = await client.get_task(GetTaskRequest(id=task_id))
    assert after.status.state == TaskState.TASK_STATE_CANCELED
    kept = agent["tokens"]
    assert reference["promptTokens"] < kept < reference["promptTokens"] + CAP // 2


# ---- bad input -----------------------------------------------------------------------------
JSONRPC_ERRORS = [
    ("malformed", b'{"jsonrpc": "2.0", "id": 1, "method": ', {}, -32700),
    ("not json-rpc", b'{"hello": "world"}', {}, -32600),
    ("unknown method", rpc("NoSuchMethod"), {}, -32601),
    ("unknown skill", rpc("SendMessage", rpc_message(skill="astrology")), {}, -32602),
    ("no parts", rpc("SendMessage", rpc_message(None)), {}, -32602),
    ("empty text", rpc("SendMessage", rpc_message("   ")), {}, -32602),
    ("unknown task", rpc("GetTask", {"id": "no-such-task"}), {}, -32001),
    ("bad version", rpc("SendMessage", rpc_message()), {"A2A-Version": "9.9"}, -32009),
    ("too large", rpc("SendMessage", rpc_message("x" * MAX_MESSAGE_BYTES)), {}, -32600),
]


@pytest.mark.parametrize("case, body, headers, code", JSONRPC_ERRORS, ids=[c[0] for c in JSONRPC_ERRORS])
async def test_jsonrpc_errors(node, case, body, headers, code):
    async with http_client(**{"A2A-Version": "1.0", **headers}) as http:
        # Raw bodies declare JSON: a body without a JSON content type is refused first (issue 17).
        raw = {"content": body, "headers": {"content-type": "application/json"}}
        kwargs = raw if isinstance(body, bytes) else {"json": body}
        response = await http.post(f"{node.url}/", **kwargs)
    assert response.status_code == 200, response.text
    assert response.json()["error"]["code"] == code, response.text


async def test_non_text_part_is_refused(node):
    params = rpc_message()
    params["message"]["parts"] = [{"data": {"x": 1}}]
    async with http_client(**{"A2A-Version": "1.0"}) as http:
        response = await http.post(f"{node.url}/skills/coordination/", json=rpc("SendMessage", params))
        rest = await http.post(f"{node.url}/message:send", json=params)
    assert response.json()["error"]["code"] == -32005, response.text
    assert rest.status_code == 415 and "CONTENT_TYPE_NOT_SUPPORTED" in rest.text, rest.text


async def test_rest_errors_are_4xx(node):
    async with http_client(**{"A2A-Version": "1.0"}) as http:
        unknown_skill = await http.post(f"{node.url}/message:send", json=rpc_message(skill="astrology"))
        too_large = await http.post(f"{node.url}/message:send", json=rpc_message("x" * MAX_MESSAGE_BYTES))
        missing = await http.get(f"{node.url}/skills/coordination/tasks/no-such-task")
        wrong_skill = await http.post(
            f"{node.url}/skills/coordination/message:send", json=rpc_message(skill="business_analysis")
        )
    assert unknown_skill.status_code == 400, unknown_skill.text
    assert too_large.status_code == 400, too_large.text
    assert missing.status_code == 404, missing.text
    assert wrong_skill.status_code == 400, wrong_skill.text


async def test_v03_clients_are_served(node):
    message = {
        "kind": "message",
        "messageId": str(uuid.uuid4()),
        "role": "user",
        "parts": [{"kind": "text", "text": "Hi"}],
    }
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "message/send",
        "params": {"message": message, "metadata": {"max_tokens": 2}},
    }
    async with httpx.AsyncClient(timeout=300) as http:
        response = await http.post(f"{node.url}/", json=body)
    result = response.json()["result"]
    assert result["kind"] == "task" and result["status"]["state"] == "completed", response.text


# ---- auth ----------------------------------------------------------------------------------
async def test_api_key_on_a_real_server(tmp_path):
    key = "test-key-123"
    secured = NodeProcess(
        free_port(), tmp_path / "cache", "--api-key", key, "--skills", "coordination"
    ).start()
    try:
        async with http_client() as http:
            card = (await http.get(f"{secured.url}/.well-known/agent-card.json")).json()
            refused = await http.post(
                f"{secured.url}/", json=rpc("SendMessage", rpc_message()), headers={"A2A-Version": "1.0"}
            )
            refused_stats = await http.get(f"{secured.url}/agents")
        assert "bearer" in card["securitySchemes"]
        assert refused.status_code == 401 and refused_stats.status_code == 401
        async with http_client(Authorization=f"Bearer {key}") as http:
            client = await a2a_client(http, secured.url)
            task = final_task(await send(client, "Hello.", max_tokens=2))
        assert task.status.state == TaskState.TASK_STATE_COMPLETED
    finally:
        assert secured.stop() == 0, secured.log()[-3000:]

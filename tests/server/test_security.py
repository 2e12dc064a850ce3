"""Issue 17, scenarios 3, 4, 5, 7 and 8 on a real node (`python -m node serve` on the tiny random-weight
GGUF, keyless, on loopback) through the official clients: push URLs and scoping, browser-facing
defaults, one admission gate for every generating route, task retention, hostile input, and cache
reuse across credentials."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid

import anthropic
import httpx
import pytest
from a2a.types import (
    CancelTaskRequest,
    GetTaskRequest,
    ListTasksRequest,
    SendMessageConfiguration,
    TaskPushNotificationConfig,
    TaskState,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.a2a_node import REPO, a2a_client, http_client, poll_until, start_tiny_node, user_message
from tests.conftest import free_port
from tests.network.test_security import serving

MAX_PENDING = 2
MAX_TASKS = 3
LONG = 20000  # tokens: a task that runs until it is cancelled (minutes on the tiny model)


@pytest.fixture(scope="module")
def node(tiny_gguf, tmp_path_factory):
    process = start_tiny_node(
        tiny_gguf,
        tmp_path_factory.mktemp("tiny-security-node"),
        "--skills",
        "technical_analysis",
        "--max-tokens",
        str(LONG),
        "--max-pending",
        str(MAX_PENDING),
        "--max-tasks",
        str(MAX_TASKS),
    )
    yield process
    process.stop()


def jsonrpc(method: str, params: dict) -> dict:
    return {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}


def send_params(text: str, **metadata) -> dict:
    message = {"messageId": str(uuid.uuid4()), "role": "ROLE_USER", "parts": [{"text": text}]}
    return {"message": {**message, "metadata": {"max_tokens": 4, **metadata}}}


async def finished(client, task_id: str):
    async def probe():
        task = await client.get_task(GetTaskRequest(id=task_id))
        return task if task.status.state in TERMINAL else None

    return await poll_until(probe, timeout_s=120)


TERMINAL = {
    TaskState.TASK_STATE_COMPLETED,
    TaskState.TASK_STATE_FAILED,
    TaskState.TASK_STATE_CANCELED,
    TaskState.TASK_STATE_REJECTED,
}


async def started_task(client, text: str, max_tokens: int) -> str:
    """A non-blocking send: the task's id, while it runs."""
    request = user_message(text, max_tokens=max_tokens)
    request.configuration.CopyFrom(SendMessageConfiguration(return_immediately=True))
    async for response in client.send_message(request):
        return response.task.id
    raise AssertionError("no task")


# ---- scenario 3: push notifications ----------------------------------------------------------
async def test_a_push_url_at_a_metadata_address_is_refused(node):
    async with http_client() as http:
        client = await a2a_client(http, node.url)
        task_id = await started_task(client, "hello", 2)
        await finished(client, task_id)
        config = TaskPushNotificationConfig(task_id=task_id, url="http://169.254.169.254/latest/meta-data/")
        with pytest.raises(Exception, match="(?i)invalid push notification url"):
            await client.create_task_push_notification_config(config)


async def test_tasks_and_push_configs_belong_to_the_caller_that_created_them(node):
    async with (
        http_client(authorization="Bearer alice") as alice_http,
        http_client(authorization="Bearer bob") as bob_http,
    ):
        alice = await a2a_client(alice_http, node.url)
        bob = await a2a_client(bob_http, node.url)
        task_id = await started_task(alice, "alice's private question", 2)
        assert (await finished(alice, task_id)).id == task_id
        with pytest.raises(Exception, match="(?i)not found"):
            await bob.get_task(GetTaskRequest(id=task_id))
        with pytest.raises(Exception, match="(?i)not found"):
            config = TaskPushNotificationConfig(task_id=task_id, url="http://127.0.0.1:9/hook")
            await bob.create_task_push_notification_config(config)
        listed = await bob.list_tasks(ListTasksRequest())
        assert task_id not in [task.id for task in listed.tasks]
        mine = await alice.list_tasks(ListTasksRequest())
        assert task_id in [task.id for task in mine.tasks]


async def test_a_push_url_that_never_answers_does_not_hold_the_task(node):
    port, calls = free_port(), []

    async def hang(request: Request):
        calls.append(time.monotonic())
        await asyncio.sleep(3600)
        return JSONResponse({})

    receiver = Starlette(routes=[Route("/hook", hang, methods=["POST"])])
    async with serving((port, receiver)), http_client() as http:
        client = await a2a_client(http, node.url)
        request = user_message("hello", max_tokens=24)
        push = TaskPushNotificationConfig(url=f"http://127.0.0.1:{port}/hook")
        request.configuration.CopyFrom(
            SendMessageConfiguration(return_immediately=True, task_push_notification_config=push)
        )
        started = time.monotonic()
        task_id = [r async for r in client.send_message(request)][0].task.id  # noqa: RUF015 (an async generator)
        task = await finished(client, task_id)
        elapsed = time.monotonic() - started
        assert calls  # delivery was attempted...
    assert task.status.state == TaskState.TASK_STATE_COMPLETED
    assert elapsed < 10, elapsed  # ...but off the task's path (inline: 10 s per event, several events)


# ---- scenario 4: browser-facing defaults -----------------------------------------------------
def test_a_body_without_a_json_content_type_starts_nothing(node):
    body = json.dumps(jsonrpc("SendMessage", send_params("from a web page"))).encode()
    for headers in ({}, {"content-type": "text/plain"}):
        response = httpx.post(
            node.url + "/", content=body, headers={"A2A-Version": "1.0", **headers}, timeout=30
        )
        assert "error" in response.json() and "result" not in response.json(), response.text
    rest = httpx.post(
        node.url + "/message:send",
        content=json.dumps(send_params("x")).encode(),
        headers={"A2A-Version": "1.0"},
    )
    assert rest.status_code == 415, rest.text
    chat = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    for path in ("/v1/messages", "/v1/messages/count_tokens", "/v1/chat/completions"):
        plain = httpx.post(node.url + path, content=json.dumps(chat), headers={"content-type": "text/plain"})
        assert plain.status_code == 415, (path, plain.text)
    register = httpx.post(node.url + "/registry/nodes", content=b"{}")
    assert register.status_code in (404, 415), register.text


def test_a_foreign_host_name_is_refused(node):
    for path in ("/health", "/tasks", "/v1/models"):
        response = httpx.get(node.url + path, headers={"host": "attacker.example"}, timeout=30)
        assert response.status_code == 421, (path, response.text)
    assert httpx.get(node.url + "/health", headers={"host": f"localhost:{node.port}"}).status_code == 200


def test_binding_beyond_loopback_without_a_key_needs_the_flag(tmp_path):
    command = [sys.executable, "-m", "node", "serve", "--host", "0.0.0.0", "--port", str(free_port())]
    done = subprocess.run(
        [*command, "--cache-dir", str(tmp_path)],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--allow-open-bind" in done.stderr, done.stderr[-2000:]


# ---- scenario 5: one admission gate for every generating route; retention --------------------
async def test_one_gate_for_every_generating_route(node):
    async with http_client() as http:
        client = await a2a_client(http, node.url)
        running = [await started_task(client, f"long task {i}", LONG) for i in range(MAX_PENDING)]
        try:
            with pytest.raises(Exception, match="(?i)overloaded"):
                await started_task(client, "one too many", 2)
            rest = await http.post(
                node.url + "/message:send", json=send_params("one too many"), headers={"A2A-Version": "1.0"}
            )
            assert rest.status_code == 429 and rest.headers["retry-after"], rest.text
            claude = anthropic.AsyncAnthropic(base_url=node.url, api_key="k", max_retries=0)
            with pytest.raises(anthropic.APIStatusError) as refused:
                await claude.messages.create(
                    model="m", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
                )
            assert refused.value.status_code == 529 and refused.value.response.headers["retry-after"]
            with pytest.raises(anthropic.APIStatusError) as counted:
                await claude.messages.count_tokens(model="m", messages=[{"role": "user", "content": "hi"}])
            assert counted.value.status_code == 529
            openai_style = await http.post(
                node.url + "/v1/chat/completions",
                json={"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
            )
            assert openai_style.status_code == 503 and openai_style.headers["retry-after"]
        finally:
            for task_id in running:
                await client.cancel_task(CancelTaskRequest(id=task_id))
        for task_id in running:
            assert (await finished(client, task_id)).status.state == TaskState.TASK_STATE_CANCELED
        # The slots came back.
        assert (await finished(client, await started_task(client, "room again", 2))).status.state in TERMINAL


async def test_finished_tasks_are_retained_up_to_the_limit(node):
    async with http_client(authorization="Bearer retention") as http:
        client = await a2a_client(http, node.url)
        ids = []
        for i in range(MAX_TASKS + 2):
            ids.append(await started_task(client, f"task {i}", 2))
            await finished(client, ids[-1])
        with pytest.raises(Exception, match="(?i)not found"):
            await client.get_task(GetTaskRequest(id=ids[0]))
        assert (await client.get_task(GetTaskRequest(id=ids[-1]))).id == ids[-1]


# ---- scenario 7: hostile input -----------------------------------------------------------------
def test_a_lone_surrogate_is_a_400_not_a_500(node):
    raw = '{"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    for path in ("/v1/messages", "/v1/messages/count_tokens", "/v1/chat/completions"):
        response = httpx.post(node.url + path, content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400, (path, response.status_code, response.text)
    a2a = json.dumps(jsonrpc("SendMessage", send_params("x"))).replace('"x"', '"a\\ud800b"')
    response = httpx.post(
        node.url + "/", content=a2a, headers={"content-type": "application/json", "A2A-Version": "1.0"}
    )
    assert response.status_code < 500, response.text


def test_unbounded_stop_sequences_are_refused(node):
    body = {
        "model": "m",
        "max_tokens": 2,
        "messages": [{"role": "user", "content": "hi"}],
        "stop_sequences": [f"stop {i}" for i in range(1000)],
    }
    response = httpx.post(node.url + "/v1/messages", json=body, timeout=30)
    assert response.status_code == 400 and "stop_sequences" in response.text
    long_stop = httpx.post(node.url + "/v1/chat/completions", json={**body, "stop": ["x" * 100_000]})
    assert long_stop.status_code in (400, 413)


# ---- scenario 8: cache reuse across credentials ------------------------------------------------
def test_a_second_credential_learns_nothing_from_anothers_cache(node):
    system = f"You are a careful assistant. {uuid.uuid4()}"
    secret_turn = [{"role": "user", "content": "My account number is 4417 1234 5678 9113. Remember it."}]

    def usage(key: str):
        client = anthropic.Anthropic(base_url=node.url, api_key=key, max_retries=0, timeout=300)
        return client.messages.create(model="m", max_tokens=2, system=system, messages=secret_turn).usage

    usage("alice")
    assert usage("alice").cache_read_input_tokens > 10  # alice's own conversation is cached
    assert usage("bob").cache_read_input_tokens <= 1  # bob's probe reads nothing of it (a BOS at most)


def test_open_connections_are_bounded_too():
    from node.config import NodeConfig
    from node.server.serve import MIN_CONNECTIONS, connection_limit

    assert connection_limit(NodeConfig(max_pending=2)) == MIN_CONNECTIONS
    assert connection_limit(NodeConfig(max_pending=100)) == 800

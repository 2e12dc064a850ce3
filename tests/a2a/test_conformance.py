"""The conformance agent (`serve --conformance`) on a real node, through the a2a-sdk client over
JSON-RPC and HTTP+JSON: the kit's scenarios, the specification's error for unsupported media, the
binding's media type, and camelCase usage in a skill's task metadata."""

from __future__ import annotations

import uuid

import httpx
import pytest
from a2a.client import ClientConfig, create_client
from a2a.types import (
    CancelTaskRequest,
    GetTaskRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    TaskState,
)
from a2a.utils.errors import ContentTypeNotSupportedError
from google.protobuf.json_format import MessageToDict

from node.a2a.conformance import SCENARIOS, scenario_for
from node.config import NodeConfig
from node.server.app import create_app
from tests.a2a_node import final_task, http_client, metadata_of, start_tiny_node

BINDINGS = ["JSONRPC", "HTTP+JSON"]
CAMEL_USAGE = {
    "promptTokens",
    "cachedTokens",
    "prefilledTokens",
    "generatedTokens",
    "prefillSeconds",
    "generateSeconds",
    "restoreSeconds",
}


@pytest.fixture(scope="module")
def node(tiny_gguf, tmp_path_factory):
    process = start_tiny_node(
        tiny_gguf,
        tmp_path_factory.mktemp("conformance-node"),
        "--skills",
        "coordination",
        "--max-tokens",
        "3",
        "--conformance",
    )
    yield process
    process.stop()


async def conformance_client(http: httpx.AsyncClient, node, binding: str, streaming: bool = False):
    config = ClientConfig(httpx_client=http, streaming=streaming, supported_protocol_bindings=[binding])
    return await create_client(f"{node.url}/conformance", config)


def tck_message(prefix: str, task_id: str = "", *parts: Part) -> SendMessageRequest:
    message = Message(
        message_id=f"{prefix}-{uuid.uuid4().hex[:8]}",
        role=Role.ROLE_USER,
        parts=list(parts) or [Part(text="conformance test")],
        task_id=task_id,
    )
    return SendMessageRequest(message=message)


async def send(client, request: SendMessageRequest) -> list:
    return [response async for response in client.send_message(request)]


# ---- the scenario table ----------------------------------------------------------------------
def test_the_longest_prefix_names_the_scenario():
    assert scenario_for("tck-artifact-file-url-abc") is SCENARIOS["tck-artifact-file-url"]
    assert scenario_for("tck-artifact-file-abc") is SCENARIOS["tck-artifact-file"]
    assert scenario_for("tck-stream-artifact-chunked-1") is SCENARIOS["tck-stream-artifact-chunked"]
    assert scenario_for("tck-send-003-abc") is None and scenario_for("") is None


async def test_the_agent_is_off_unless_enabled():
    for enabled, status in ((False, 404), (True, 200)):
        app = create_app(NodeConfig(port=9999, conformance=enabled))
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://localhost"
        ) as http:
            card = await http.get("/conformance/.well-known/agent-card.json")
        assert card.status_code == status, card.text
    assert card.json()["supportedInterfaces"][0]["url"] == "http://127.0.0.1:9999/conformance"
    assert card.headers["last-modified"].endswith("GMT")


# ---- the scenarios on a real node ------------------------------------------------------------
@pytest.mark.parametrize("binding", BINDINGS)
async def test_input_required_then_completed_then_history(node, binding):
    async with http_client() as http:
        client = await conformance_client(http, node, binding)
        waiting = final_task(await send(client, tck_message("tck-input-required")))
        assert waiting.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
        again = final_task(await send(client, tck_message("tck-input-required", waiting.id)))
        assert again.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
        done = final_task(await send(client, tck_message("tck-complete-task", waiting.id)))
        fetched = await client.get_task(GetTaskRequest(id=waiting.id))
    assert done.id == waiting.id and done.status.state == TaskState.TASK_STATE_COMPLETED
    assert done.status.message.parts[0].text == "Hello from TCK"
    user_turns = [m for m in fetched.history if m.role == Role.ROLE_USER]
    # Every message has its own messageId (tck_message), so each is kept, in order.
    assert [m.message_id.split("-")[1] for m in user_turns] == ["input", "input", "complete"]


@pytest.mark.parametrize("binding", BINDINGS)
async def test_artifacts_of_every_part_kind(node, binding):
    async with http_client() as http:
        client = await conformance_client(http, node, binding)
        parts = {
            prefix: final_task(await send(client, tck_message(prefix))).artifacts[0].parts[0]
            for prefix in (
                "tck-artifact-text",
                "tck-artifact-file",
                "tck-artifact-file-url",
                "tck-artifact-data",
            )
        }
    assert parts["tck-artifact-text"].text == "Generated text content"
    assert (parts["tck-artifact-file"].raw, parts["tck-artifact-file"].filename) == (b"tck", "output.txt")
    assert parts["tck-artifact-file-url"].url == "https://example.com/output.txt"
    assert parts["tck-artifact-file-url"].media_type == "text/plain"
    assert MessageToDict(parts["tck-artifact-data"].data) == {"key": "value", "count": 42}


@pytest.mark.parametrize("binding", BINDINGS)
async def test_a_direct_message_reply(node, binding):
    async with http_client() as http:
        client = await conformance_client(http, node, binding)
        (response,) = await send(client, tck_message("tck-message-response"))
    assert response.HasField("message") and response.message.parts[0].text == "Direct message response"


@pytest.mark.parametrize("binding", BINDINGS)
async def test_a_chunked_artifact_streams_as_one_artifact(node, binding):
    async with http_client() as http:
        client = await conformance_client(http, node, binding, streaming=True)
        events = await send(client, tck_message("tck-stream-artifact-chunked"))
    chunks = [e.artifact_update for e in events if e.HasField("artifact_update")]
    states = [e.status_update.status.state for e in events if e.HasField("status_update")]
    assert events[0].HasField("task")
    assert [c.artifact.parts[0].text for c in chunks] == ["chunk-1 ", "chunk-2"]
    assert len({c.artifact.artifact_id for c in chunks}) == 1
    assert [c.append for c in chunks] == [False, True] and chunks[-1].last_chunk
    assert states == [TaskState.TASK_STATE_WORKING, TaskState.TASK_STATE_COMPLETED]


@pytest.mark.parametrize("binding", BINDINGS)
async def test_a_waiting_task_is_canceled(node, binding):
    async with http_client() as http:
        client = await conformance_client(http, node, binding)
        waiting = final_task(await send(client, tck_message("tck-input-required")))
        canceled = await client.cancel_task(CancelTaskRequest(id=waiting.id))
    assert canceled.status.state == TaskState.TASK_STATE_CANCELED


# ---- the specification's errors and media types ----------------------------------------------
@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize("agent", ["/conformance", "/skills/coordination"])
async def test_unsupported_media_is_content_type_not_supported(node, binding, agent):
    part = Part(raw=b"tck", media_type="application/x-unsupported-tck-type")
    async with http_client() as http:
        config = ClientConfig(httpx_client=http, streaming=False, supported_protocol_bindings=[binding])
        client = await create_client(f"{node.url}{agent}", config)
        with pytest.raises(ContentTypeNotSupportedError, match="application/x-unsupported-tck-type"):
            await send(client, tck_message("tck-send-003", "", part))


async def test_http_json_speaks_application_json_and_415(node):
    body = {"message": {"messageId": "m-1", "role": "ROLE_USER", "parts": [{"data": {"x": 1}}]}}
    async with http_client(**{"A2A-Version": "1.0"}) as http:
        refused = await http.post(f"{node.url}/skills/coordination/message:send", json=body)
        body["message"]["messageId"] = "tck-complete-task-1"
        served = await http.post(f"{node.url}/conformance/message:send", json=body)
        missing = await http.get(f"{node.url}/conformance/tasks/no-such-task")
    assert refused.status_code == 415 and "CONTENT_TYPE_NOT_SUPPORTED" in refused.text, refused.text
    assert served.status_code == 200, served.text
    for response in (refused, served, missing):
        assert response.headers["content-type"] == "application/json", response.headers


async def test_a_skill_reports_usage_in_camel_case(node):
    async with http_client() as http:
        config = ClientConfig(httpx_client=http, streaming=False)
        client = await create_client(f"{node.url}/skills/coordination", config)
        request = tck_message("usage")
        request.message.metadata.update({"max_tokens": 2, "delegate": False})
        task = final_task(await send(client, request))
    metadata = metadata_of(task)
    assert task.status.state == TaskState.TASK_STATE_COMPLETED, task
    assert set(metadata) == {"skill", "finishReason", "usage"}
    assert set(metadata["usage"]) == CAMEL_USAGE
    assert (
        metadata["usage"]["promptTokens"]
        == metadata["usage"]["cachedTokens"] + metadata["usage"]["prefilledTokens"]
    )

"""The node app in-process (httpx ASGITransport, no model): cards, API key, body checks.

Without a lifespan the app has no agent manager, which is all these checks need; the real server
with the model is exercised in tests/integration/test_a2a_server.py.
"""

from __future__ import annotations

import httpx
import pytest

from node.config import NodeConfig
from node.server.app import create_app

KEY = "s3cret-key"
GET_TASK = {"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "no-such-task"}}


@pytest.fixture
def secured():
    app = create_app(NodeConfig(port=9999, api_key=KEY, skills=("coordination", "technical_analysis")))
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(transport=transport, base_url="http://localhost", headers={"A2A-Version": "1.0"})


async def test_cards_stay_public_and_declare_the_scheme(secured):
    async with secured as http:
        for path in (
            "/.well-known/agent-card.json",
            "/.well-known/agent.json",
            "/skills/technical_analysis/.well-known/agent-card.json",
        ):
            response = await http.get(path)
            assert response.status_code == 200, path
            card = response.json()
            assert set(card["securitySchemes"]) == {"bearer", "apiKey"}
            assert card["securityRequirements"]
        assert (await http.get("/skills/business_analysis/.well-known/agent-card.json")).status_code == 404


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "/", GET_TASK),
        ("POST", "/skills/coordination/", GET_TASK),
        ("GET", "/tasks/x", None),
        ("GET", "/agents", None),
    ],
)
async def test_calls_without_the_key_are_refused(secured, method, path, body):
    async with secured as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}):
            response = await http.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, (headers, response.text)
            assert response.headers["www-authenticate"].startswith("Bearer")


async def test_calls_with_the_key_pass(secured):
    async with secured as http:
        for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}):
            response = await http.post("/", json=GET_TASK, headers=headers)
            assert response.json()["error"]["code"] == -32001  # reached the handler: task not found
        assert (await http.get("/health")).status_code == 503  # public, and says it is still starting


async def test_without_a_key_nothing_is_refused():
    app = create_app(NodeConfig(port=9999))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as http:
        response = await http.post("/", json=GET_TASK, headers={"A2A-Version": "1.0"})
        card = (await http.get("/.well-known/agent-card.json")).json()
    assert response.json()["error"]["code"] == -32001
    assert "securitySchemes" not in card


@pytest.fixture
def plain():
    app = create_app(NodeConfig(port=9999, skills=("coordination", "technical_analysis")))
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(transport=transport, base_url="http://localhost", headers={"A2A-Version": "1.0"})


V03_FIELDS = {"url", "preferredTransport", "protocolVersion", "additionalInterfaces"}


@pytest.mark.parametrize("agent", ["", "/skills/technical_analysis"])
async def test_v1_card_at_the_well_known_path_and_v03_card_at_the_legacy_one(plain, agent):
    async with plain as http:
        current = await http.get(f"{agent}/.well-known/agent-card.json")
        legacy = await http.get(f"{agent}/.well-known/agent.json")
        # HTTP+JSON clients append the method's path to the interface URL.
        interfaces = current.json()["supportedInterfaces"]
        rest = next(i["url"] for i in interfaces if i["protocolBinding"] == "HTTP+JSON")
        missing = await http.get(f"{rest}/tasks/no-such-task")
    for response in (current, legacy):
        assert response.headers["cache-control"].startswith("public, max-age=")
        assert response.headers["etag"]
    # The v1.0 schema allows no v0.3 fields; v0.3 clients need them.
    assert not V03_FIELDS & set(current.json())
    assert {i["protocolVersion"] for i in interfaces} == {"1.0"}
    assert V03_FIELDS <= set(legacy.json())
    assert legacy.json()["url"] == f"http://127.0.0.1:9999{agent}"
    assert missing.status_code == 404 and missing.json()["error"]  # the handler's answer, not a routing 404


@pytest.mark.parametrize("path", ["/", "/skills/technical_analysis", "/skills/technical_analysis/"])
async def test_jsonrpc_refuses_a_body_that_is_not_json(plain, path):
    async with plain as http:
        refused = await http.post(
            path, content=str(GET_TASK).encode(), headers={"Content-Type": "text/plain"}
        )
        served = await http.post(
            path, json=GET_TASK, headers={"Content-Type": "application/json; charset=utf-8"}
        )
    assert refused.json()["error"]["code"] == -32005
    assert served.json()["error"]["code"] == -32001  # reached the handler: task not found


@pytest.mark.parametrize(
    "path", ["/message:send", "/skills/technical_analysis/message:send", "/v1/message:send"]
)
async def test_http_json_refuses_a_body_that_is_not_json(plain, path):
    body = {"message": {"messageId": "m", "role": "ROLE_USER", "parts": []}}
    async with plain as http:
        refused = await http.post(path, content=str(body).encode(), headers={"Content-Type": "text/plain"})
        served = await http.post(path, json=body)
    assert refused.status_code == 415, refused.text
    assert served.status_code == 400, served.text  # reached the handler: no parts

"""The registry's input parsing, through the node app's own route and guards (httpx ASGITransport,
no model, members in SQLite): every malformed register body is a 4xx that registers nothing."""

from __future__ import annotations

import json

import httpx
import pytest

from node.config import NodeConfig
from node.network.registry import MAX_TTL_S, REGISTRY_PATH
from node.server.app import create_app

MAX_BODY = 4096
URL = "http://10.0.0.7:8000"
GOOD = {"url": URL, "skills": ["technical_analysis", "business_analysis"], "ttl_s": 30}


@pytest.fixture
async def registry(tmp_path):
    config = NodeConfig(
        port=9999, skills=("coordination",), registry=True, cache_dir=tmp_path, max_message_bytes=MAX_BODY
    )
    app = create_app(config)
    registry = app.state.network.registry  # started by hand: the app's lifespan would load the model
    await registry.start()
    registry.verify = _vouched  # this file tests parsing; tests/network/test_security.py the card check
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
            yield http
    finally:
        await registry.stop()


async def _vouched(url: str, card_url: str, skills: tuple[str, ...]) -> None:
    return None


async def listed(http: httpx.AsyncClient, skill: str | None = None) -> list[dict]:
    response = await http.get(REGISTRY_PATH, params={"skill": skill} if skill else {})
    assert response.status_code == 200, response.text
    return response.json()["members"]


async def test_a_registration_is_listed_by_skill_and_leaves(registry):
    response = await registry.post(REGISTRY_PATH, json={**GOOD, "url": URL + "/"})
    assert response.status_code == 200, response.text
    member = response.json()["member"]
    assert member["url"] == URL  # without the trailing slash
    assert member["card_url"] == f"{URL}/.well-known/agent-card.json"
    assert member["skills"] == GOOD["skills"] and member["ttl_s"] == 30
    assert [m["url"] for m in await listed(registry)] == [URL]
    assert [m["url"] for m in await listed(registry, "business_analysis")] == [URL]
    assert await listed(registry, "coordination") == []

    card = "https://cards.example/a.json"
    again = await registry.post(REGISTRY_PATH, json={**GOOD, "card_url": card, "skills": []})
    assert again.json()["member"]["card_url"] == card and len(await listed(registry)) == 1  # a heartbeat

    left = await registry.delete(REGISTRY_PATH, params={"url": URL + "/"})
    assert left.json() == {"removed": True} and await listed(registry) == []


async def test_ttl_defaults_and_edges(registry):
    without = await registry.post(REGISTRY_PATH, json={"url": URL, "skills": ["coordination"]})
    assert without.status_code == 200 and without.json()["member"]["ttl_s"] == 30
    edge = await registry.post(REGISTRY_PATH, json={**GOOD, "ttl_s": MAX_TTL_S})
    assert edge.status_code == 200 and edge.json()["member"]["ttl_s"] == MAX_TTL_S


BAD_BODIES = {
    "not json": b'{"url": "http://10.0.0.7:8000", ',
    "empty body": b"",
    "a list": b"[]",
    "a string": b'"http://10.0.0.7:8000"',
    "null": b"null",
    "no url": {"skills": ["coordination"]},
    "url not a string": {**GOOD, "url": 8000},
    "url without scheme": {**GOOD, "url": "10.0.0.7:8000"},
    "url not a url": {**GOOD, "url": "not a url"},
    "url empty": {**GOOD, "url": ""},
    "ftp url": {**GOOD, "url": "ftp://10.0.0.7/"},
    "file url": {**GOOD, "url": "file:///etc/passwd"},
    "javascript url": {**GOOD, "url": "javascript:alert(1)"},
    "url over 500 chars": {**GOOD, "url": "http://" + "a" * 500 + ".example"},
    "bad card url": {**GOOD, "card_url": "ftp://cards.example/a.json"},
    "card url not a string": {**GOOD, "card_url": ["http://x"]},
    "no skills": {"url": URL},
    "skills a string": {**GOOD, "skills": "technical_analysis"},
    "skills null": {**GOOD, "skills": None},
    "a skill not a string": {**GOOD, "skills": ["technical_analysis", 3]},
    "an empty skill": {**GOOD, "skills": [""]},
    "a skill with a comma": {**GOOD, "skills": ["technical_analysis,business_analysis"]},
    "ttl zero": {**GOOD, "ttl_s": 0},
    "ttl negative": {**GOOD, "ttl_s": -5},
    "ttl too long": {**GOOD, "ttl_s": MAX_TTL_S + 1},
    "ttl not a number": {**GOOD, "ttl_s": "thirty"},
    "ttl null": {**GOOD, "ttl_s": None},
    "ttl a list": {**GOOD, "ttl_s": [30]},
    "ttl a boolean": {**GOOD, "ttl_s": True},
    "ttl NaN": b'{"url": "http://10.0.0.7:8000", "skills": [], "ttl_s": NaN}',
    "ttl Infinity": b'{"url": "http://10.0.0.7:8000", "skills": [], "ttl_s": Infinity}',
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
async def test_bad_registrations_are_refused_and_register_nothing(registry, body):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await registry.post(
        REGISTRY_PATH, content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith("bad registration: "), response.text
    assert await listed(registry) == []


async def test_an_oversized_registration_is_refused_unread(registry):
    body = {**GOOD, "skills": [f"skill_{i}" for i in range(MAX_BODY // 8)]}
    content = json.dumps(body).encode()
    assert len(content) > MAX_BODY
    response = await registry.post(
        REGISTRY_PATH, content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413, response.text
    assert await listed(registry) == []


@pytest.mark.parametrize("params", [{}, {"url": ""}, {"url": "http://10.0.0.8:8000"}, {"url": "not a url"}])
async def test_leaving_without_a_known_url_removes_nothing(registry, params):
    assert (await registry.post(REGISTRY_PATH, json=GOOD)).status_code == 200
    response = await registry.delete(REGISTRY_PATH, params=params)
    assert response.status_code == 200 and response.json() == {"removed": False}
    assert [m["url"] for m in await listed(registry)] == [URL]

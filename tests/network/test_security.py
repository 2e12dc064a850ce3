"""Issue 17, scenarios 1, 2 and 6 (delegation): what the node sends to others, who may join its
registry, where its outbound calls may go, and how long a sub-task may take. Real servers on free
ports (uvicorn in this event loop), real HTTP, no model."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import pytest
import uvicorn
from a2a.types import AgentCapabilities, AgentCard, AgentInterface, AgentSkill
from google.protobuf.json_format import MessageToDict
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from node.config import NodeConfig
from node.network.node_network import Network
from node.network.outbound import OutboundRefused, address_allowed, outbound_client
from node.network.peers import Delegator, PeerClient, PeerDirectory, clean_usage
from node.network.registry import REGISTRY_PATH
from node.server.app import create_app
from tests.conftest import free_port
from tests.network.test_peers import SKILL, scripted_peers

INBOUND_KEY = "the-node-own-inbound-key"
START_TIMEOUT_S = 30


def card_json(url: str, interface_url: str | None = None) -> dict:
    card = AgentCard(
        name="spy",
        description="records what it is sent",
        version="1",
        supported_interfaces=[
            AgentInterface(url=interface_url or url + "/", protocol_binding="JSONRPC", protocol_version="1.0")
        ],
        capabilities=AgentCapabilities(streaming=True),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[AgentSkill(id=SKILL, name=SKILL, description="spy", tags=["test"])],
    )
    return MessageToDict(card)


class Spy:
    """A server that records every request (method, path, headers) and serves a card."""

    def __init__(self, interface_url: str | None = None, card_bytes: int = 0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.interface_url = interface_url
        self.card_bytes = card_bytes
        self.requests: list[tuple[str, str, dict]] = []

    def app(self) -> Starlette:
        async def anything(request: Request):
            self.requests.append((request.method, request.url.path, dict(request.headers)))
            if request.url.path.endswith("agent-card.json"):
                if self.card_bytes:
                    return StreamingResponse(_endless(self.card_bytes), media_type="application/json")
                return JSONResponse(card_json(self.url, self.interface_url))
            if request.url.path == REGISTRY_PATH and request.method == "GET":
                return JSONResponse({"members": []})
            return JSONResponse({})

        return Starlette(routes=[Route("/{path:path}", anything, methods=["GET", "POST", "DELETE"])])

    def authorizations(self) -> list[str]:
        return [h.get("authorization", "") for _, _, h in self.requests]


async def _endless(total: int):
    chunk = b" " * 65536
    for _ in range(total // len(chunk) + 1):
        yield chunk


@contextlib.asynccontextmanager
async def serving(*apps: tuple[int, Starlette]):
    servers = [
        uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
        for port, app in apps
    ]
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while not all(server.started for server in servers):
            assert not any(task.done() for task in tasks), "a test server died"
            assert time.monotonic() < deadline, "the test servers did not start"
            await asyncio.sleep(0.05)
        yield
    finally:
        for server in servers:
            server.should_exit = server.force_exit = True  # a hanging request must not hold the test
        await asyncio.gather(*tasks, return_exceptions=True)


async def wait_for(probe, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while not (value := probe()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)
    return value


# ---- scenario 1: the node's own key never leaves it ------------------------------------------
async def test_the_inbound_key_is_never_sent_and_each_origin_gets_only_its_own_key():
    registry, peer, stranger = Spy(), Spy(), Spy()
    config = NodeConfig(
        port=free_port(),
        skills=("coordination",),
        api_key=INBOUND_KEY,
        join=registry.url,
        network_key="network-secret",
        peers=(peer.url, stranger.url),
        peer_keys=(f"{peer.url}=peer-secret",),
        heartbeat_s=0.2,
    )
    network = Network(config)
    async with serving(
        (registry.port, registry.app()), (peer.port, peer.app()), (stranger.port, stranger.app())
    ):
        await network.start()
        try:
            await wait_for(lambda: any(m == "POST" for m, _, _ in registry.requests))
            await network.delegator.directory.candidates(SKILL)  # reads both peers' cards
        finally:
            await network.stop()
    everything = registry.authorizations() + peer.authorizations() + stranger.authorizations()
    assert stranger.requests and peer.requests and registry.requests
    assert not any(INBOUND_KEY in value for value in everything)
    assert set(registry.authorizations()) == {"Bearer network-secret"}
    assert set(peer.authorizations()) == {"Bearer peer-secret"}
    assert set(stranger.authorizations()) == {""}


def test_the_node_sends_its_own_key_to_itself_only():
    from node.network.outbound import origin, peer_credentials

    config = NodeConfig(port=8123, api_key=INBOUND_KEY, peers=("http://10.0.0.9:8000",))
    assert peer_credentials(config) == {origin("http://127.0.0.1:8123"): INBOUND_KEY}


# ---- scenario 2: membership needs the network key, the card vouches, no private URLs ---------
@contextlib.asynccontextmanager
async def registry_node(tmp_path, **settings):
    port = free_port()
    config = NodeConfig(port=port, skills=("coordination",), registry=True, cache_dir=tmp_path, **settings)
    app = create_app(config)
    registry = app.state.network.registry  # started by hand: the app's lifespan would load the model
    await registry.start()
    try:
        async with serving((port, app)), httpx.AsyncClient(base_url=config.base_url, timeout=30) as http:
            yield http
    finally:
        await registry.stop()


async def test_joining_and_leaving_need_the_network_key(tmp_path):
    member = Spy()
    body = {"url": member.url, "skills": [SKILL], "ttl_s": 30}
    async with serving((member.port, member.app())), registry_node(tmp_path, network_key="net") as http:
        anonymous = await http.post(REGISTRY_PATH, json=body)
        wrong = await http.post(REGISTRY_PATH, json=body, headers={"authorization": "Bearer guess"})
        joined = await http.post(REGISTRY_PATH, json=body, headers={"authorization": "Bearer net"})
        listed_anonymously = await http.get(REGISTRY_PATH)
        removal = await http.delete(REGISTRY_PATH, params={"url": member.url})
        listed = await http.get(REGISTRY_PATH, headers={"x-api-key": "net"})
    assert anonymous.status_code == 401 and wrong.status_code == 401
    assert joined.status_code == 200, joined.text
    assert listed_anonymously.status_code == 401
    assert removal.status_code == 401
    assert [m["url"] for m in listed.json()["members"]] == [member.url]


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254",  # cloud metadata
        "http://10.1.2.3:8000",  # a private network
        "http://[fe80::1]:8000",  # link-local
        "http://0.0.0.0:8000",
    ],
)
async def test_a_registration_at_a_private_or_metadata_address_is_refused(tmp_path, url):
    async with registry_node(tmp_path) as http:
        response = await http.post(REGISTRY_PATH, json={"url": url, "skills": [SKILL]})
        listed = await http.get(REGISTRY_PATH)
    assert response.status_code == 400 and "refused" in response.text, response.text
    assert listed.json()["members"] == []


async def test_a_registration_is_taken_only_when_the_card_at_its_url_vouches_for_it(tmp_path):
    honest, pointing_away = Spy(), Spy(interface_url="http://127.0.0.1:9/elsewhere")
    apps = ((honest.port, honest.app()), (pointing_away.port, pointing_away.app()))
    async with serving(*apps), registry_node(tmp_path) as http:
        good = await http.post(REGISTRY_PATH, json={"url": honest.url, "skills": [SKILL]})
        unlisted_skill = await http.post(REGISTRY_PATH, json={"url": honest.url, "skills": ["coordination"]})
        away = await http.post(REGISTRY_PATH, json={"url": pointing_away.url, "skills": [SKILL]})
        nobody = await http.post(
            REGISTRY_PATH, json={"url": f"http://127.0.0.1:{free_port()}", "skills": [SKILL]}
        )
        other_card = await http.post(
            REGISTRY_PATH,
            json={"url": honest.url, "card_url": pointing_away.url + "/card", "skills": [SKILL]},
        )
    assert good.status_code == 200, good.text
    assert unlisted_skill.status_code == 400 and "does not list coordination" in unlisted_skill.text
    assert away.status_code == 400 and "not at" in away.text
    assert nobody.status_code == 400 and "no agent card" in nobody.text
    assert other_card.status_code == 400 and "not at the member's origin" in other_card.text


async def test_a_card_pointing_elsewhere_gets_no_message():
    target = Spy()
    liar = Spy(interface_url=target.url + "/")
    config = NodeConfig(port=free_port(), skills=("coordination",), peers=(liar.url,))
    async with serving((target.port, target.app()), (liar.port, liar.app())), outbound_client(config) as http:
        delegator = Delegator(PeerDirectory(config, http), PeerClient(http, timeout_s=10))
        result = await delegator.run(SKILL, "internal secrets?", "ctx", {})
    assert result.answer is None
    assert [(a.peer, a.outcome) for a in result.attempts] == [(liar.url, "refused")]
    assert not [r for r in target.requests if r[0] == "POST"]  # the user's text never went there


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("93.184.216.34", True),
        ("169.254.169.254", False),
        ("10.0.0.1", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),
        ("fd00::1", False),
        ("::ffff:169.254.169.254", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
    ],
)
def test_outbound_address_policy(address, allowed):
    assert address_allowed(address, allow_private=False) is allowed


def test_private_ranges_only_with_the_flag():
    assert address_allowed("10.0.0.1", allow_private=True)
    assert address_allowed("169.254.169.254", allow_private=True)
    assert not address_allowed("0.0.0.0", allow_private=True)


# ---- scenario 6: a sub-task's total deadline, attempt cap, capped bodies ---------------------
async def test_a_sub_task_has_one_deadline_and_an_attempt_cap_over_all_its_peers():
    async with (
        scripted_peers("slow", "slow", "slow", "slow", "slow") as peers,
        httpx.AsyncClient(timeout=30) as http,
    ):
        config = NodeConfig(port=free_port(), skills=("coordination",), peers=tuple(peers))
        delegator = Delegator(PeerDirectory(config, http), PeerClient(http, timeout_s=2.0), deadline_s=3.0)
        started = time.monotonic()
        result = await delegator.run(SKILL, "Cache or not?", "ctx-deadline", {})
        elapsed = time.monotonic() - started
    assert result.answer is None
    assert len(result.attempts) <= 3
    assert elapsed < 6.0, elapsed  # five hanging peers x 2 s each would be 10 s


async def test_an_endless_card_is_cut_off():
    endless = Spy(card_bytes=64 << 20)
    config = NodeConfig(port=free_port(), skills=("coordination",), peers=(endless.url,))
    async with serving((endless.port, endless.app())), outbound_client(config) as http:
        with pytest.raises(OutboundRefused, match="exceeds"):
            await http.get(endless.url + "/.well-known/agent-card.json")
        assert await PeerDirectory(config, http).candidates(SKILL) == []


def test_a_peers_malformed_usage_is_no_figures():
    assert clean_usage("lots") == {}
    assert clean_usage({"promptTokens": "12", "cachedTokens": True, "generatedTokens": 5}) == {
        "generatedTokens": 5
    }
    assert clean_usage({"generatedTokens": float("nan"), "x": -1}) == {}

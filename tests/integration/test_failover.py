"""Agents move between devices: three real nodes share a block store on SeaweedFS (S3 gateway on
loopback) and a registry and task store in PostgreSQL.

    N2: registry; N1 and, later, N3 join it; all host technical_analysis on the tiny model with
    --block-store s3://agents/failover

A conversation runs on N1; once N1's /health says its write-back is done, N1 is killed (SIGKILL).
The next turn, sent to N2, reports cached tokens covering the whole history (pulled from the store,
not prefilled); N3, started afterwards, resumes the conversation the same way, and is killed right
after that turn (its write-back and the rest of its pulled blocks possibly still under way):
restarted, it serves the next turn with the whole history cached.
"""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from tests.a2a_node import a2a_client, final_task, http_client, poll_until, send, start_tiny_node, usage
from tests.conftest import free_port
from tests.postgres_cluster import postgres_bin, postgres_cluster
from tests.seaweedfs import s3_client, s3_environment, seaweedfs, weed_unusable

pytestmark = [
    pytest.mark.skipif(weed_unusable() is not None, reason=str(weed_unusable())),
    pytest.mark.skipif(
        postgres_bin() is None, reason="PostgreSQL binaries absent (apt-get install postgresql)"
    ),
]
SKILL = "technical_analysis"
TURN = "Explain how a write-ahead log keeps a database consistent after a crash, step by step. " * 10


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    with seaweedfs() as weed, postgres_cluster(free_port()) as database_url:
        yield weed, database_url


@pytest.fixture(scope="module")
def start(tiny_gguf, tmp_path_factory, shared):
    weed, database_url = shared
    folder = tmp_path_factory.mktemp("failover")
    started = {}

    def start_node(name: str, *flags: str):
        """A new node, or one started before (then killed) again on its own folder."""
        with pytest.MonkeyPatch.context() as env:
            for key, value in s3_environment(weed.endpoint).items():
                env.setenv(key, value)
            if name in started:
                env.setenv("NODE_MODEL_CACHE", str(folder / name / "models"))
                return started[name].start()
            (folder / name).mkdir()
            node = start_tiny_node(
                tiny_gguf, folder / name, "--skills", SKILL, "--max-tokens", "8", "--heartbeat", "1",
                "--database-url", database_url, "--block-store", "s3://agents/failover", *flags,
            )  # fmt: skip
        started[name] = node
        return node

    yield start_node
    for node in started.values():
        node.stop()


async def _turn(http, node, context_id: str) -> dict:
    client = await a2a_client(http, f"{node.url}/skills/{SKILL}")
    started = time.perf_counter()
    task = final_task(await send(client, TURN, context_id))
    return {**usage(task), "seconds": time.perf_counter() - started}


async def _written_back(http, node) -> dict:
    async def probe():
        store = (await http.get(f"{node.url}/health")).json()["block_store"]
        return store if store["pending_contexts"] == 0 and store["manifests_uploaded"] else None

    return await poll_until(probe, timeout_s=60)


async def _routed(http, asked, context_id: str, expected: str) -> dict:
    """Poll GET /contexts/{id} on `asked` until it routes to `expected` (heartbeats carry holders)."""

    async def probe():
        found = (await http.get(f"{asked.url}/contexts/{context_id}", params={"skill": SKILL})).json()
        return found if found.get("route_to") == expected else None

    return await poll_until(probe, timeout_s=30)


def _kill(node) -> None:
    node.proc.kill()
    node.proc.wait()
    node.proc = None


async def test_a_conversation_resumes_on_other_nodes_when_its_node_dies(start):
    n2 = start("n2", "--registry")
    n1 = start("n1", "--join", n2.url)
    context_id = str(uuid.uuid4())
    async with http_client() as http:
        first = await _turn(http, n1, context_id)
        second = await _turn(http, n1, context_id)
        await _written_back(http, n1)
        hot = await _routed(http, n2, context_id, n1.url)  # N1 holds it: follow-ups go there
        _kill(n1)
        failed_over = await _routed(http, n2, context_id, n2.url)  # N1 expired: any live node
        cold = await _turn(http, n2, str(uuid.uuid4()))  # a new conversation: the playbook only
        third = await _turn(http, n2, context_id)
        health = (await http.get(f"{n2.url}/health")).json()
        await _written_back(http, n2)
        n3 = start("n3", "--join", n2.url)
        fourth = await _turn(http, n3, context_id)
        joined = (await http.get(f"{n3.url}/health")).json()["block_store"]
        after = await _routed(http, n3, context_id, n3.url)  # the registry follows the last holder
        _kill(n3)
        start("n3")  # restarted on its own cache folder
        fifth = await _turn(http, n3, context_id)
    print(
        f"\nfailover figures: turn 2 on N1 prompt {second['promptTokens']} tokens; turn 3 on N2: prompt "
        f"{third['promptTokens']}, cached {third['cachedTokens']}, prefilled {third['prefilledTokens']}, "
        f"{third['seconds']:.3f} s end to end, pull {health['block_store']['last_pull']}; a new conversation "
        f"on N2 cached {cold['cachedTokens']}; turn 4 on N3 (joined later): cached {fourth['cachedTokens']} of "
        f"{fourth['promptTokens']}, {fourth['seconds']:.3f} s, pull {joined['last_pull']}; turn 5 on N3 "
        f"killed and restarted: cached {fifth['cachedTokens']} of {fifth['promptTokens']}"
    )
    assert first["cachedTokens"] < second["cachedTokens"]
    # the history up to turn 2's reply came from the store (a reply re-rendered by the chat template
    # is re-tokenized, as on one node); a new conversation there has only the playbook cached
    assert third["cachedTokens"] >= second["promptTokens"] > cold["cachedTokens"] + len(TURN) // 8
    assert third["prefilledTokens"] == third["promptTokens"] - third["cachedTokens"]
    assert health["block_store"]["last_pull"]["tokens"] >= second["promptTokens"]
    assert fourth["cachedTokens"] >= third["promptTokens"]
    assert fifth["cachedTokens"] >= fourth["promptTokens"]  # turn 4 survived the kill
    assert joined["reachable"] is True
    assert hot["holder"] == n1.url and hot["alive"]
    assert failed_over["holder"] == n1.url and not failed_over["alive"]
    assert n1.url not in failed_over["members"]
    assert after["holder"] == n3.url and after["alive"]


def test_the_store_holds_every_version_whole(shared):
    """No torn manifest: every version object in the store parses and names blocks that exist."""
    weed, _ = shared
    client = s3_client(weed.endpoint)
    objects = client.list_objects_v2(Bucket="agents", Prefix="failover/contexts/").get("Contents", [])
    assert objects
    for item in objects:
        manifest = httpx.get(f"{weed.endpoint}/agents/{item['Key']}").json()
        for ref in manifest["blocks"]:
            for part in ("head", "rest") if "split" in ref else ("safetensors",):
                key = f"failover/blocks/{ref['key'][:2]}/{ref['key']}.{part}"
                assert client.head_object(Bucket="agents", Key=key)["ContentLength"] > 0

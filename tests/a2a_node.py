"""A real `python -m node serve` process for tests, and small a2a-sdk client helpers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from a2a.client import ClientConfig, create_client
from a2a.types import Message, Part, Role, SendMessageRequest, StreamResponse
from google.protobuf.json_format import MessageToDict

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 240
CLIENT_TIMEOUT_S = 300


class NodeProcess:
    """One node server on a fixed port and cache folder; `restart` keeps both."""

    def __init__(self, port: int, cache_dir: Path, *extra: str) -> None:
        self.port, self.cache_dir, self.extra = port, cache_dir, extra
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = cache_dir.parent / f"node-{port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> NodeProcess:
        command = [
            sys.executable,
            "-m",
            "node",
            "serve",
            "--port",
            str(self.port),
            "--cache-dir",
            str(self.cache_dir),
        ]
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [*command, *self.extra], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy()
            )
        self._wait_healthy()
        return self

    def stop(self) -> int:
        """SIGINT, as Ctrl-C would: uvicorn shuts down gracefully and the manager checkpoints."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"node did not become healthy in {START_TIMEOUT_S} s:\n{self.log()[-3000:]}")


async def poll_until(probe, timeout_s: float = 120, interval_s: float = 0.1):
    """Await `probe()` until it returns something truthy, and return that; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (value := await probe()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s; last probe gave {value!r}")
        await asyncio.sleep(interval_s)
    return value


def http_client(**headers: str) -> httpx.AsyncClient:
    # The SDK's own default timeout (5 s) is far shorter than a CPU generation.
    return httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, headers=headers)


async def a2a_client(http: httpx.AsyncClient, url: str, streaming: bool = False):
    return await create_client(url, ClientConfig(httpx_client=http, streaming=streaming))


def user_message(text: str, context_id: str | None = None, **metadata) -> SendMessageRequest:
    message = Message(
        message_id=str(uuid.uuid4()),
        role=Role.ROLE_USER,
        parts=[Part(text=text)],
        context_id=context_id or "",
        metadata=metadata or None,
    )
    return SendMessageRequest(message=message)


async def send(client, text: str, context_id: str | None = None, **metadata) -> list[StreamResponse]:
    return [response async for response in client.send_message(user_message(text, context_id, **metadata))]


def final_task(responses: list[StreamResponse]):
    """The task of a non-streaming send (one response holding the task)."""
    assert len(responses) == 1 and responses[0].HasField("task"), responses
    return responses[0].task


def metadata_of(event) -> dict:
    """The metadata of a task, status update or message, as plain JSON."""
    return MessageToDict(event.metadata)


def usage(task) -> dict:
    return metadata_of(task)["usage"]


def members(registry: str, skill: str | None = None) -> list[str]:
    params = {"skill": skill} if skill else {}
    response = httpx.get(f"{registry}/registry/nodes", params=params, timeout=10)
    response.raise_for_status()
    return [m["url"] for m in response.json()["members"]]


def wait_for_members(registry: str, expected: set[str], timeout_s: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = members(registry)
        if set(found) == expected:
            return found
        time.sleep(0.3)
    raise AssertionError(f"registry members {found}, expected {expected}")


def start_tiny_node(gguf: Path, folder: Path, *flags: str) -> NodeProcess:
    """A node on the tiny random-weight GGUF; its converted copy and its caches stay in `folder`."""
    from tests.conftest import free_port

    with pytest.MonkeyPatch.context() as env:
        env.setenv("NODE_MODEL_CACHE", str(folder / "models"))
        return NodeProcess(free_port(), folder / "cache", "--model", str(gguf), *flags).start()

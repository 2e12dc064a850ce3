"""`python -m node load --url URL --clients N --seconds T`: bounded mixed traffic against a node on
this machine, and what became of it.

Each client loops until the time is up, sending in turn an A2A `SendMessage` (JSON-RPC, blocking,
to an analysis skill, a new conversation or the client's last one continued), an Anthropic `/v1/messages` request and the
same streamed. Every generation asks for `max_tokens` tokens at most. A refusal (429, 529, 503 or
A2A's OVERLOADED) is counted as rejected and the client waits the Retry-After it was given (at most
`MAX_BACKOFF_S`). The report: completed, rejected, errors (5xx counted apart), tasks that did not
end in a terminal state, latency percentiles of completed requests, and the node's peak RSS (read
from /proc for the process listening on the URL's port, so loopback only).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from node.config import is_loopback_host
from node.errors import ConfigError

MAX_BACKOFF_S = 1.0
REQUEST_TIMEOUT_S = 300.0
# The analysis skills: a coordination task delegates to peers, here the node itself, whose
# sub-tasks need gate slots of their own (measure coordination with the demo instead).
SKILLS = ("technical_analysis", "business_analysis")
TERMINAL = {"TASK_STATE_COMPLETED", "TASK_STATE_FAILED", "TASK_STATE_CANCELED", "TASK_STATE_REJECTED"}


@dataclass
class Tally:
    completed: int = 0
    rejected: int = 0
    errors: int = 0
    server_errors: int = 0  # 5xx
    not_terminal: int = 0  # A2A tasks that came back neither finished nor failed
    latencies_s: list[float] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)  # the first few error descriptions

    def error(self, description: str, status: int | None = None) -> None:
        self.errors += 1
        if status is not None and status >= 500:
            self.server_errors += 1
        if len(self.samples) < 5:
            self.samples.append(description[:300])


@dataclass(frozen=True)
class LoadReport:
    clients: int
    seconds: float
    completed: int
    rejected: int
    errors: int
    server_errors: int
    not_terminal: int
    p50_s: float | None
    p95_s: float | None
    p99_s: float | None
    peak_rss_bytes: int | None
    error_samples: tuple[str, ...]

    def lines(self) -> list[str]:
        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value * 1000:.0f} ms"

        rss = "-" if self.peak_rss_bytes is None else f"{self.peak_rss_bytes / 2**20:.0f} MiB"
        return [
            f"clients {self.clients}, {self.seconds:.0f} s",
            (
                f"completed {self.completed}, rejected (429/529/503/OVERLOADED) {self.rejected}, "
                f"errors {self.errors} (5xx {self.server_errors}), tasks not terminal {self.not_terminal}"
            ),
            f"latency p50 {ms(self.p50_s)}, p95 {ms(self.p95_s)}, p99 {ms(self.p99_s)}",
            f"node peak RSS {rss}",
            *(f"error: {sample}" for sample in self.error_samples),
        ]


def percentile(values: list[float], q: float) -> float | str:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ---- the node's memory -----------------------------------------------------------------------
def listening_pid(port: int) -> int | None:
    """The process listening on TCP `port` on this machine (via /proc; Linux only)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(pid)
        except OSError:
            continue
    return None


def peak_rss_bytes(pid: int | None) -> int | None:
    """The process's high-water resident set (VmHWM)."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ---- one client ------------------------------------------------------------------------------
class Client:
    def __init__(self, http: httpx.AsyncClient, url: str, max_tokens: int, tally: Tally) -> None:
        self.http, self.url, self.max_tokens, self.tally = http, url, max_tokens, tally
        self.context_id: str | None = None
        self.turn = 0

    async def run(self, deadline: float) -> None:
        kinds = (self.a2a, self.anthropic, self.anthropic_stream)
        while time.monotonic() < deadline:
            request = kinds[self.turn % len(kinds)]
            self.turn += 1
            started = time.monotonic()
            try:
                outcome = await request()
            except (httpx.HTTPError, ValueError, KeyError) as e:
                self.tally.error(f"{request.__name__}: {type(e).__name__}: {e}")
                continue
            if outcome is OK:
                self.tally.completed += 1
                self.tally.latencies_s.append(time.monotonic() - started)
            elif outcome is not COUNTED:  # a refusal: wait as told
                self.tally.rejected += 1
                await asyncio.sleep(min(outcome, MAX_BACKOFF_S))

    def _refusal(self, response: httpx.Response) -> float | str:
        if response.status_code in (429, 503, 529):
            return float(response.headers.get("retry-after") or 1)
        return None

    def _ok(self, response: httpx.Response, what: str) -> bool:
        if response.status_code >= 400:
            self.tally.error(f"{what}: {response.status_code} {response.text}", response.status_code)
            return False
        return True

    async def a2a(self) -> float | str:
        if self.turn % 6 == 1:
            self.context_id = None  # every other A2A turn starts a new conversation
        message = {
            "messageId": str(uuid.uuid4()),
            "role": "ROLE_USER",
            "parts": [{"text": f"Turn {self.turn}: should we cache the product database?"}],
            "metadata": {"max_tokens": self.max_tokens, "skill": SKILLS[self.turn % len(SKILLS)]},
        }
        if self.context_id:
            message["contextId"] = self.context_id
        body = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"message": message}}
        response = await self.http.post(self.url + "/", json=body, headers={"A2A-Version": "1.0"})
        if (retry := self._refusal(response)) is not None:
            return retry
        if not self._ok(response, "a2a"):
            return COUNTED
        answer = response.json()
        if "error" in answer:
            if (retry := overloaded(answer["error"])) is not None:
                return retry
            self.tally.error(f"a2a: {answer['error']}")
            return COUNTED
        task = answer["result"]["task"]
        self.context_id = task.get("contextId")
        state = task["status"]["state"]
        if state not in TERMINAL:
            self.tally.not_terminal += 1
        if state != "TASK_STATE_COMPLETED":
            self.tally.error(f"a2a task {state}: {json.dumps(task['status'])[:200]}")
            return COUNTED
        return OK

    def _messages_body(self, stream: bool) -> dict:
        return {
            "model": "load",
            "max_tokens": self.max_tokens,
            "stream": stream,
            "system": "You are terse.",
            "messages": [{"role": "user", "content": f"Turn {self.turn}: name one fruit."}],
        }

    async def anthropic(self) -> float | str:
        response = await self.http.post(self.url + "/v1/messages", json=self._messages_body(False))
        if (retry := self._refusal(response)) is not None:
            return retry
        if not self._ok(response, "messages"):
            return COUNTED
        response.json()["content"]
        return OK

    async def anthropic_stream(self) -> float | str:
        async with self.http.stream(
            "POST", self.url + "/v1/messages", json=self._messages_body(True)
        ) as response:
            if (retry := self._refusal(response)) is not None:
                return retry
            text = (await response.aread()).decode()
            if not self._ok(response, "messages stream"):
                return COUNTED
        if "event: message_stop" not in text:
            self.tally.error(f"messages stream ended without message_stop: {text[-200:]}")
            return COUNTED
        return OK


def overloaded(error: dict) -> float | None:
    """The Retry-After of an A2A OVERLOADED error (its ErrorInfo metadata), None for others."""
    details = error.get("data") or []
    for detail in details if isinstance(details, list) else [details]:
        metadata = detail.get("metadata", detail) if isinstance(detail, dict) else {}
        if isinstance(metadata, dict) and metadata.get("reason") == "OVERLOADED":
            return float(metadata.get("retryAfterSeconds", 1))
    return None


OK = "ok"  # a request's outcomes: OK, COUNTED (an error, in the tally), or a refusal's Retry-After
COUNTED = "counted"


async def run_load(
    url: str, clients: int, seconds: float, max_tokens: int = 8, api_key: str | None = None
) -> LoadReport:
    parts = urlsplit(url)
    if not is_loopback_host(parts.hostname or ""):
        raise ConfigError(f"load goes to loopback only (a node on this machine), not {url}")
    pid = listening_pid(parts.port or 80)
    headers = {"x-api-key": api_key} if api_key else {}
    tally = Tally()
    limits = httpx.Limits(max_connections=clients * 2)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, headers=headers, limits=limits) as http:
        deadline = time.monotonic() + seconds
        workers = [Client(http, url.rstrip("/"), max_tokens, tally) for _ in range(clients)]
        await asyncio.gather(*(worker.run(deadline) for worker in workers))
    return LoadReport(
        clients=clients,
        seconds=seconds,
        completed=tally.completed,
        rejected=tally.rejected,
        errors=tally.errors,
        server_errors=tally.server_errors,
        not_terminal=tally.not_terminal,
        p50_s=percentile(tally.latencies_s, 0.50),
        p95_s=percentile(tally.latencies_s, 0.95),
        p99_s=percentile(tally.latencies_s, 0.99),
        peak_rss_bytes=peak_rss_bytes(pid),
        error_samples=tuple(tally.samples),
    )


def add_parser(commands) -> None:
    p = commands.add_parser("load", help="mixed A2A and Anthropic load against a node on this machine")
    p.add_argument("--url", required=True, help="the node's URL (loopback)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--max-tokens", dest="load_max_tokens", type=int, default=8, help="per generation")
    p.add_argument("--key", dest="load_key", default=None, help="the node's API key, if it has one")
    p.add_argument(
        "--json", dest="load_json", default=None, metavar="PATH", help="also write the report here"
    )


def run(args, config, progress) -> int:
    report = asyncio.run(run_load(args.url, args.clients, args.seconds, args.load_max_tokens, args.load_key))
    for line in report.lines():
        print(line)
    if args.load_json:
        Path(args.load_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.load_json).write_text(json.dumps(asdict(report), indent=2))
    return 0 if report.server_errors == 0 and report.not_terminal == 0 else 1

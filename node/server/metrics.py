"""`/metrics` for Prometheus (prometheus-client), on a registry of the app's own.

Per finished task, labelled by skill (`chat` for the Anthropic and OpenAI APIs): histograms of
restore, prefill and decode seconds; prompt tokens by source (`prefilled` or `cached`: read from
the agent's cache, in memory or restored from disk), generated tokens, tasks by finish reason.
At scrape time: cache bytes, tokens and agents in memory and on disk with the budgets, the queue
depth (tasks waiting for their agent or the model's thread) by skill, the tasks running. Refused
requests (401, 413, 429, 503, 529) are counted by `RejectionCounter`, labelled by status and by
the API or skill the path names.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REFUSED_STATUSES = frozenset({401, 403, 413, 421, 429, 503, 529})
# Restores take milliseconds, prefill and decode seconds to minutes on a CPU.
RESTORE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
COMPUTE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
PATH_LABELS = (
    ("/v1/messages", "anthropic"),
    ("/v1/chat/completions", "openai"),
    ("/v1/models", "models"),
    ("/mcp", "mcp"),
    ("/dashboard", "dashboard"),
    ("/metrics", "metrics"),
    ("/registry", "registry"),
)


class NodeMetrics:
    """The node's metrics; `state` (set by the app) gives the manager's stats and the live tasks."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        seconds = "seconds per task, by skill"
        self.restore_s = Histogram(
            "node_restore_seconds", f"agent restore {seconds}", ["skill"],
            registry=self.registry, buckets=RESTORE_BUCKETS,
        )  # fmt: skip
        self.prefill_s = Histogram(
            "node_prefill_seconds", f"prefill {seconds}", ["skill"],
            registry=self.registry, buckets=COMPUTE_BUCKETS,
        )  # fmt: skip
        self.decode_s = Histogram(
            "node_decode_seconds", f"decode {seconds}", ["skill"],
            registry=self.registry, buckets=COMPUTE_BUCKETS,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "node_prompt_tokens", "prompt tokens by source: prefilled, or cached (reused or restored)",
            ["skill", "source"], registry=self.registry,
        )  # fmt: skip
        self.generated_tokens = Counter(
            "node_generated_tokens", "tokens generated", ["skill"], registry=self.registry
        )
        self.tasks = Counter(
            "node_tasks",
            "finished tasks by finish reason",
            ["skill", "finish_reason"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "node_rejected_requests", "requests refused (key, size, admission)", ["status", "api"],
            registry=self.registry,
        )  # fmt: skip
        self.state: Callable[[], tuple[dict, dict[str, int], int]] | None = None
        self.registry.register(_StateCollector(self))

    def task_finished(self, skill: str, completion) -> None:
        usage = completion.usage
        if usage.restore_s > 0:
            self.restore_s.labels(skill).observe(usage.restore_s)
        if usage.prefilled_tokens > 0:
            self.prefill_s.labels(skill).observe(usage.prefill_s)
        self.decode_s.labels(skill).observe(usage.generate_s)
        self.prompt_tokens.labels(skill, "prefilled").inc(usage.prefilled_tokens)
        self.prompt_tokens.labels(skill, "cached").inc(usage.cached_tokens)
        self.generated_tokens.labels(skill).inc(usage.generated_tokens)
        self.tasks.labels(skill, completion.finish_reason).inc()

    def refused(self, status: int, path: str) -> None:
        self.rejected.labels(str(status), api_label(path)).inc()

    async def endpoint(self, request: Request) -> Response:
        # The scrape reads the checkpoint folder (disk I/O): off the event loop.
        body = await asyncio.to_thread(generate_latest, self.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)


def api_label(path: str) -> str:
    if path.startswith("/skills/"):
        return path.split("/")[2] or "a2a"
    return next((label for prefix, label in PATH_LABELS if path.startswith(prefix)), "a2a")


class _StateCollector:
    """Gauges read when scraped: cache use against the budgets, queue depth, running tasks."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self.metrics = metrics

    def describe(self):
        return []  # no fixed description: the gauges exist once the node has started

    def collect(self):
        if self.metrics.state is None:
            return
        stats, queued, running = self.metrics.state()
        disk = stats.get("on_disk") or {}
        where = ["where"]
        cache_bytes = GaugeMetricFamily("node_cache_bytes", "KV cache bytes", labels=where)
        cache_bytes.add_metric(["memory"], stats.get("bytes_in_memory", 0))
        cache_bytes.add_metric(["disk"], disk.get("bytes", 0))
        tokens = GaugeMetricFamily("node_cache_tokens", "tokens held in agents' caches", labels=where)
        tokens.add_metric(["memory"], stats.get("tokens_cached", 0))
        tokens.add_metric(["disk"], disk.get("tokens", 0))
        agents = GaugeMetricFamily("node_agents", "agents", labels=where)
        agents.add_metric(["memory"], stats.get("agents_in_memory", 0))
        agents.add_metric(["disk"], disk.get("agents", 0))
        budget = GaugeMetricFamily("node_cache_budget_bytes", "cache budget", labels=where)
        budget.add_metric(["memory"], stats.get("memory_budget_bytes", 0))
        if disk.get("disk_budget_bytes") is not None:
            budget.add_metric(["disk"], disk["disk_budget_bytes"])
        queue = GaugeMetricFamily("node_queue_depth", "tasks waiting for the model", labels=["skill"])
        for skill, count in queued.items():
            queue.add_metric([skill], count)
        yield from (cache_bytes, tokens, agents, budget, queue)
        yield GaugeMetricFamily("node_tasks_running", "tasks the node runs now", value=running)


class RejectionCounter:
    """ASGI middleware (outermost) counting the responses that refuse a request."""

    def __init__(self, app: ASGIApp, metrics: NodeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] in REFUSED_STATUSES:
                self.metrics.refused(message["status"], scope.get("path", ""))
            await send(message)

        await self.app(scope, receive, counted_send)

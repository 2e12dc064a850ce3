"""The dashboard in a real browser (Debian's Chromium driven by Playwright), and /metrics.

A real node process on the tiny model, behind an API key. The browser logs in with the key, asks a
skill through the page's box, and then watches: the context is listed, the time saved shows, and
while a follow-up runs the live-task table shows it, fed by the page's server-sent events.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from node.server.serve import GRACEFUL_SHUTDOWN_S
from tests.a2a_node import start_tiny_node

KEY = "dashboard-test-key"
SKILLS = "technical_analysis,business_analysis"
# Long enough (in the tiny model's mostly byte-level vocabulary) to measure the prefill rate.
QUESTION = (
    "We run a small fleet of services that share one database and the cat sat on the mat; "
    "should we split the database per service, and what would the migration cost us in downtime, "
    "people and risk over the next two quarters?"
)
TASK_TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def node(tiny_gguf, tmp_path_factory):
    process = start_tiny_node(
        tiny_gguf, tmp_path_factory.mktemp("dashboard"), "--skills", SKILLS, "--api-key", KEY
    )
    yield process
    process.stop()


def chromium() -> str:
    path = os.environ.get("NODE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None and sys.platform != "linux":
        pytest.skip("no Chromium on this machine (set NODE_CHROMIUM)")
    if path is None:
        pytest.fail("no chromium: `bash .ci/setup --test` installs Debian's chromium")
    return path


def ask(page, question: str) -> None:
    page.fill("#ask-question", question)
    page.click("#ask-button")


def test_dashboard_lists_the_context_and_follows_a_running_task(node):
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox cannot start.
        browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        assert page.goto(f"{node.url}/dashboard").status == 401  # the key is required: a form asks
        page.fill("#key", "not-the-key")
        page.click("#login")
        expect(page.locator("#key")).to_be_visible()  # refused: the form again
        page.fill("#key", KEY)
        page.click("#login")  # posts the key (not in a URL), sets the cookie, redirects
        page.wait_for_url(f"{node.url}/dashboard")
        expect(page.locator("#live")).to_have_text("live")
        expect(page.locator("#network tbody tr")).to_contain_text(node.url)

        page.select_option("#ask-skill", "technical_analysis")
        ask(page, QUESTION)
        expect(page.locator("#ask-usage")).to_contain_text("from cache", timeout=TASK_TIMEOUT_MS)
        context_id = page.input_value("#ask-context")
        row = page.locator("#contexts tbody tr", has_text=context_id[:18])
        expect(row).to_have_count(1)
        expect(row.locator("td").nth(7)).to_have_text("1")  # turns
        expect(page.locator("#saved-today")).to_have_text(re.compile(r"^\d+\.\d (s|min|h)$"))
        expect(page.locator("#saved-today")).not_to_have_text("0.0 s")
        expect(page.locator("#saved-today-detail")).to_contain_text("1 tasks")

        ask(page, "And what should we measure first?")  # the follow-up, same context
        live = page.locator("#tasks tbody tr")
        expect(live).to_have_count(1, timeout=TASK_TIMEOUT_MS)
        expect(live).to_contain_text("technical_analysis")
        expect(live.locator("td").nth(3)).to_have_text(re.compile("queued|prefill|decode"))
        expect(page.locator("#task-count")).to_have_text("1")
        expect(live).to_have_count(0, timeout=TASK_TIMEOUT_MS)  # it ended: the event said so
        expect(row.locator("td").nth(7)).to_have_text("2")
        expect(page.locator("#saved-today-detail")).to_contain_text("2 tasks")
        browser.close()


def test_metrics_after_a_task_and_a_refused_request(node):
    headers = {"Authorization": f"Bearer {KEY}"}
    answer = httpx.post(
        f"{node.url}/dashboard/ask",
        json={"skill": "business_analysis", "question": "Is the mat worth buying?"},
        headers=headers,
        timeout=TASK_TIMEOUT_MS / 1000,
    )
    assert answer.status_code == 200, answer.text
    assert httpx.get(f"{node.url}/dashboard/state", timeout=10).status_code == 401

    metrics = httpx.get(f"{node.url}/metrics", headers=headers, timeout=10)

    assert metrics.headers["content-type"].startswith("text/plain")
    samples = dict(
        line.rsplit(" ", 1) for line in metrics.text.splitlines() if line and not line.startswith("#")
    )
    skill = 'skill="business_analysis"'
    assert float(samples[f"node_prefill_seconds_count{{{skill}}}"]) >= 1
    assert float(samples[f"node_decode_seconds_count{{{skill}}}"]) >= 1
    assert float(samples[f'node_prompt_tokens_total{{{skill},source="cached"}}']) > 0
    assert float(samples[f'node_prompt_tokens_total{{{skill},source="prefilled"}}']) > 0
    assert float(samples['node_rejected_requests_total{api="dashboard",status="401"}']) >= 1
    assert float(samples['node_cache_bytes{where="disk"}']) > 0
    assert float(samples['node_cache_bytes{where="memory"}']) > 0
    assert samples["node_tasks_running"] == "0.0"


def test_an_open_event_stream_does_not_hold_the_shutdown(tiny_gguf, tmp_path):
    node = start_tiny_node(tiny_gguf, tmp_path, "--skills", "technical_analysis")
    with httpx.stream("GET", f"{node.url}/dashboard/events", timeout=30) as events:
        lines = events.iter_lines()
        assert next(lines) == "event: state"
        started = time.monotonic()
        assert node.stop() == 0
        stopped_s = time.monotonic() - started
    assert stopped_s < GRACEFUL_SHUTDOWN_S, stopped_s
    assert "timeout graceful shutdown exceeded" not in node.log()

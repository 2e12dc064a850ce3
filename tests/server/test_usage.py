"""The usage ledger: per-day totals, the prefill rate, and the file read back at start-up."""

from __future__ import annotations

import json
import time

from node.server.usage import LEDGER_FILE, TaskUsage, UsageLedger

DAY_S = 86_400


def task(at: float, agent: str, cached: int, prefilled: int, prefill_s: float, restore_s: float = 0.0):
    return TaskUsage(
        at, "technical_analysis", agent, cached + prefilled, cached, prefilled, 8, prefill_s, 0.5, restore_s
    )


def test_today_and_overall_with_the_measured_prefill_rate(tmp_path):
    ledger = UsageLedger.open(tmp_path)
    now = time.time()
    ledger.record(task(now - 2 * DAY_S, "a", cached=0, prefilled=1000, prefill_s=4.0))  # rate: 4 ms/token
    ledger.record(task(now, "a", cached=1000, prefilled=20, prefill_s=0.1, restore_s=0.5))
    ledger.record(task(now, "b", cached=500, prefilled=10, prefill_s=0.05))

    summary = ledger.summary()

    assert summary["seconds_per_prefill_token"] == 0.004  # short prefills do not set the rate
    assert summary["today"] == {
        "tasks": 2,
        "sessions": 2,
        "prompt_tokens": 1530,
        "prefill_tokens_avoided": 1500,
        "prefilled_tokens": 30,
        "generated_tokens": 16,
        "seconds_saved": 5.5,  # 1500 tokens * 4 ms - 0.5 s restoring
    }
    assert summary["overall"]["tasks"] == 3 and summary["overall"]["sessions"] == 2
    assert summary["days"] == 2


def test_the_file_is_read_back_and_a_cut_line_is_skipped(tmp_path):
    ledger = UsageLedger.open(tmp_path)
    ledger.record(task(time.time(), "a", cached=300, prefilled=200, prefill_s=1.0))
    with (tmp_path / LEDGER_FILE).open("a") as f:
        f.write('{"at": 1, "skill": "tech')  # a crash mid-append

    again = UsageLedger.open(tmp_path)

    assert again.summary()["today"]["tasks"] == 1
    assert again.summary()["seconds_per_prefill_token"] == 0.005
    lines = (tmp_path / LEDGER_FILE).read_text().splitlines()
    assert json.loads(lines[0])["agent_id"] == "a"


def test_a_prefill_measured_at_start_up_sets_the_rate_and_is_kept(tmp_path):
    ledger = UsageLedger.open(tmp_path)
    ledger.record(task(time.time(), "a", cached=1000, prefilled=5, prefill_s=0.1))
    assert ledger.summary()["today"]["seconds_saved"] == 0.0  # no rate measured yet

    ledger.record_prefill(1374, 2.748)  # a skill's playbook: 2 ms per token
    ledger.record_prefill(20, 1.0)  # too short to measure anything

    for reading in (ledger, UsageLedger.open(tmp_path)):
        assert reading.summary()["seconds_per_prefill_token"] == 0.002
        assert reading.summary()["today"]["seconds_saved"] == 2.0
        assert reading.summary()["today"]["tasks"] == 1

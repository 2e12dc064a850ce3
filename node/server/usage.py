"""The node's record of finished tasks: what each one prefilled, reused and saved, kept on disk.

`UsageLedger` appends one JSON line per finished task to `<cache-dir>/usage.jsonl` and keeps the
totals per day in memory (read back from the file at start-up), so the dashboard can say what the
caches saved today and since the file began. Seconds saved are estimated the way the agent manager
does it: the prompt tokens served from cache times the node's measured prefill seconds per token
(from tasks that prefilled at least `MIN_RATE_TOKENS`, and from the skills' playbooks prefilled at
start-up, both kept in the file), minus the time spent restoring.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)
LEDGER_FILE = "usage.jsonl"
MIN_RATE_TOKENS = 128


@dataclass(frozen=True)
class TaskUsage:
    """One finished task as the ledger keeps it."""

    at: float  # unix time
    skill: str
    agent_id: str
    prompt_tokens: int
    cached_tokens: int
    prefilled_tokens: int
    generated_tokens: int
    prefill_s: float
    generate_s: float
    restore_s: float

    @property
    def day(self) -> str:
        return time.strftime("%Y-%m-%d", time.localtime(self.at))


@dataclass
class DayTotals:
    tasks: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    generated_tokens: int = 0
    restore_s: float = 0.0
    agents: set[str] = field(default_factory=set)

    def add(self, usage: TaskUsage) -> None:
        self.tasks += 1
        self.prompt_tokens += usage.prompt_tokens
        self.cached_tokens += usage.cached_tokens
        self.prefilled_tokens += usage.prefilled_tokens
        self.generated_tokens += usage.generated_tokens
        self.restore_s += usage.restore_s
        self.agents.add(usage.agent_id)

    def merge(self, other: DayTotals) -> None:
        self.tasks += other.tasks
        self.prompt_tokens += other.prompt_tokens
        self.cached_tokens += other.cached_tokens
        self.prefilled_tokens += other.prefilled_tokens
        self.generated_tokens += other.generated_tokens
        self.restore_s += other.restore_s
        self.agents |= other.agents

    def summary(self, seconds_per_token: float) -> dict:
        return {
            "tasks": self.tasks,
            "sessions": len(self.agents),
            "prompt_tokens": self.prompt_tokens,
            "prefill_tokens_avoided": self.cached_tokens,
            "prefilled_tokens": self.prefilled_tokens,
            "generated_tokens": self.generated_tokens,
            "seconds_saved": round(max(0.0, self.cached_tokens * seconds_per_token - self.restore_s), 3),
        }


class UsageLedger:
    """Per-day totals of finished tasks, appended to a JSON-lines file (None: memory only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._days: dict[str, DayTotals] = {}
        self._rate_tokens, self._rate_s = 0, 0.0
        self._lock = threading.Lock()  # record() runs on worker threads, summary() on the loop

    @classmethod
    def open(cls, cache_dir: Path) -> UsageLedger:
        ledger = cls(Path(cache_dir) / LEDGER_FILE)
        ledger._load()
        return ledger

    def record(self, usage: TaskUsage) -> None:
        """Count `usage` and append it to the file (blocking: call it off the event loop)."""
        with self._lock:
            self._add(usage)
            self._append(asdict(usage))

    def _append(self, line: dict) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        except OSError as e:
            logger.warning("usage ledger %s: not written: %s", self.path, e)

    def record_prefill(self, tokens: int, seconds: float) -> None:
        """A prefill measured outside a task (the skills' playbooks at start-up), kept for the rate
        (blocking: call it off the event loop)."""
        if tokens < MIN_RATE_TOKENS or seconds <= 0:
            return
        with self._lock:
            self._add_rate(tokens, seconds)
            self._append({"at": time.time(), "prefill_tokens": tokens, "prefill_s": seconds})

    def seconds_per_token(self) -> float:
        return self._rate_s / self._rate_tokens if self._rate_tokens else 0.0

    def summary(self, today: str | None = None) -> dict:
        """{"today": {...}, "overall": {...}, "days": N, "seconds_per_prefill_token": x}."""
        today = today or time.strftime("%Y-%m-%d")
        with self._lock:
            rate = self.seconds_per_token()
            overall = DayTotals()
            for totals in self._days.values():
                overall.merge(totals)
            return {
                "today": self._days.get(today, DayTotals()).summary(rate),
                "overall": overall.summary(rate),
                "days": len(self._days),
                "seconds_per_prefill_token": rate,
            }

    def _add(self, usage: TaskUsage) -> None:
        self._days.setdefault(usage.day, DayTotals()).add(usage)
        if usage.prefilled_tokens >= MIN_RATE_TOKENS and usage.prefill_s > 0:
            self._add_rate(usage.prefilled_tokens, usage.prefill_s)

    def _add_rate(self, tokens: int, seconds: float) -> None:
        self._rate_tokens, self._rate_s = self._rate_tokens + tokens, self._rate_s + seconds

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                data = json.loads(line)
                if "prefill_tokens" in data:
                    self._add_rate(int(data["prefill_tokens"]), float(data["prefill_s"]))
                else:
                    self._add(TaskUsage(**data))
            except (ValueError, TypeError, KeyError):
                continue  # a line cut short by a crash: the rest still counts
